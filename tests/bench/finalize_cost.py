"""Benchmark: CPU cost of finalize's archive encoding, per hour of stereo audio.

Builds captures exactly as the recorder leaves them in ``captures/ready/<id>/``: two
mono 8 kHz 16-bit WAV legs (customer, employee) with speech (espeak-ng + sox, as
``agent.testcall.speech`` makes it) taking turns over a faint line noise, the
employee's leg a little shorter (as a real capture's often is), and ``capture.json``.
Then the real ``Finalizer`` turns them into outbox entries, once per archive format
the config supports. CPU is this process plus its children (ffmpeg), from
``os.times()``; the figures are medians over ``--repeats``.

Columns: cpu_s/audio_h = CPU seconds per hour of stereo audio (python = this process:
pydub, merge, sha256, manifest; ffmpeg = children), x_realtime = audio seconds per
wall second of the finalize loop (one call at a time), kbit/s = output size over
audio duration.

    .venv/bin/python -m tests.bench.finalize_cost                    # 12 x 5 min = 1 h
    .venv/bin/python -m tests.bench.finalize_cost --calls 4 --minutes 2 --formats opus
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import tempfile
import time
import warnings
import wave
from pathlib import Path

from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Direction,
    Employee,
    Flag,
    iso_ms,
    new_recording_id,
    utc_now,
    write_meta,
)
from agent.manifest import AUDIO_FORMATS
from agent.recorder.finalize import Finalizer
from agent.recorder.uplink.outbox import Outbox
from agent.testcall.speech import RATE, make_speech
from tests.bench.common import emit, median
from tests.support.stack import Keys, agent_config, make_keys

with warnings.catch_warnings():  # pydub needs it too; gone in 3.13 (FACTS.md)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

MODULE = "tests.bench.finalize_cost"
SITE = "hel-1"
WIDTH = 2
NOISE = 0.004  # line noise: ~-48 dBFS peak, far below speech, above digital silence
SHORTER_EMPLOYEE_S = 0.4  # the employee's leg ends this much earlier


def pcm(path: Path) -> bytes:
    with wave.open(str(path), "rb") as src:
        assert src.getframerate() == RATE and src.getsampwidth() == WIDTH
        return src.readframes(src.getnframes())


def conversation(speech_dir: Path, seconds: float) -> tuple[bytes, bytes]:
    """Two legs that take turns: the customer speaks while the employee listens and
    back, with short pauses, over faint noise on both lines."""
    speech = make_speech(speech_dir)
    customer, employee = pcm(speech.customer), pcm(speech.employee)
    pause = b"\0\0" * int(RATE * 0.6)
    left, right = bytearray(), bytearray()
    total = int(seconds * RATE) * WIDTH
    while len(left) < total:
        for talk in (customer, employee):
            quiet = b"\0" * len(talk)
            left += (talk if talk is customer else quiet) + pause
            right += (talk if talk is employee else quiet) + pause
    left_b = audioop.add(bytes(left[:total]), audioop.mul(os.urandom(total), WIDTH, NOISE), WIDTH)
    right_b = audioop.add(bytes(right[:total]), audioop.mul(os.urandom(total), WIDTH, NOISE), WIDTH)
    return left_b, right_b[: total - int(SHORTER_EMPLOYEE_S * RATE) * WIDTH]


def write_wav(path: Path, frames: bytes) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(WIDTH)
        out.setframerate(RATE)
        out.writeframes(frames)


def make_captures(
    ready: Path, keys: Keys, legs: tuple[bytes, bytes], calls: int, seconds: float
) -> list[str]:
    """``calls`` finished captures in ``ready`` (each moved in with one rename)."""
    ready.mkdir(parents=True, exist_ok=True)
    ids = []
    for _ in range(calls):
        rid = new_recording_id()
        staging = ready.parent / f".staging-{rid}"
        staging.mkdir(parents=True)
        write_wav(staging / CUSTOMER_LEG, legs[0])
        write_wav(staging / EMPLOYEE_LEG, legs[1])
        end = utc_now()
        start = end - dt.timedelta(seconds=seconds)
        write_meta(
            staging,
            CaptureMeta(
                recording_id=rid,
                site=SITE,
                source="siprec",
                call_ref=rid[:16],
                direction=Direction.INBOUND,
                started_at=iso_ms(start),
                ended_at=iso_ms(end),
                service_number="+3581005577",
                customer=keys.protector().protect("+358 40 123 4567"),
                employees=(
                    Employee(
                        "e1001", "Aino Virtanen", "sip:1001@pbx.example", iso_ms(start), "parcels"
                    ),
                ),
                legs=(CUSTOMER_LEG, EMPLOYEE_LEG),
            ),
        )
        staging.rename(ready / rid)
        ids.append(rid)
    return ids


def cpu() -> tuple[float, float]:
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def run_format(
    root: Path, keys: Keys, legs: tuple[bytes, bytes], fmt: str, args: argparse.Namespace
) -> dict[str, float]:
    work = root / f"{fmt}-{time.monotonic_ns()}"
    work.mkdir()
    cfg, _ = agent_config(work, keys, "127.0.0.1:9", audio={"format": fmt})
    ids = make_captures(cfg.captures_dir / "ready", keys, legs, args.calls, args.minutes * 60)
    finalizer = Finalizer(cfg)
    self0, kids0 = cpu()
    start = time.perf_counter()
    for rid in ids:
        finalizer.handle(rid)
    wall = time.perf_counter() - start
    self1, kids1 = cpu()
    outbox = Outbox(cfg.outbox_dir)
    if sorted(outbox.entries()) != sorted(ids):
        raise SystemExit(f"{fmt}: not every capture reached the outbox (see the log)")
    size = 0
    flags: set[str] = set()
    for rid in ids:
        entry = outbox.open(rid)
        size += entry.manifest.size
        flags.update(entry.manifest.flags)
        if entry.manifest.channels != 2:
            raise SystemExit(f"{fmt}: {rid} has {entry.manifest.channels} channels")
    unexpected = flags - {Flag.LENGTH_MISMATCH.value}
    if unexpected:
        raise SystemExit(f"{fmt}: unexpected flags {sorted(unexpected)}")
    audio_s = args.calls * args.minutes * 60
    hours = audio_s / 3600
    shutil.rmtree(work)
    return {
        "cpu_h": (self1 - self0 + kids1 - kids0) / hours,
        "python_h": (self1 - self0) / hours,
        "ffmpeg_h": (kids1 - kids0) / hours,
        "realtime": audio_s / wall,
        "cpu_realtime": audio_s / max(1e-9, self1 - self0 + kids1 - kids0),
        "kbit_s": size * 8 / 1000 / audio_s,
        "wall_s": wall,
    }


COLUMNS = [
    "format",
    "cpu_s/audio_h",
    "python_s/h",
    "ffmpeg_s/h",
    "x_realtime",
    "x_realtime/cpu",
    "kbit/s",
    "wall_s",
]
KEYS = ["cpu_h", "python_h", "ffmpeg_h", "realtime", "cpu_realtime", "kbit_s", "wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=5.0, help="length of each call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--formats", default=",".join(AUDIO_FORMATS), help="comma-separated archive formats"
    )
    parser.add_argument("--dir", type=Path, default=None, help="work directory")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for fmt in formats:
        if fmt not in AUDIO_FORMATS:
            parser.error(f"--formats: {fmt!r} is not one of {sorted(AUDIO_FORMATS)}")
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-finalize-", dir=args.dir))
    try:
        keys = make_keys(root / "keys")
        legs = conversation(root / "speech", args.minutes * 60)
        runs: dict[str, list[dict[str, float]]] = {f: [] for f in formats}
        for i in range(args.repeats):
            for fmt in formats:
                got = run_format(root, keys, legs, fmt, args)
                runs[fmt].append(got)
                print(
                    f"repeat {i + 1} {fmt}: {got['cpu_h']:.1f} CPU s per audio hour, "
                    f"{got['realtime']:.0f}x real time",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {f: {k: median([r[k] for r in runs[f]]) for k in KEYS} for f in formats}
    rows = [[f, *(summary[f][k] for k in KEYS)] for f in formats]
    emit(
        "finalize_cost",
        MODULE,
        {
            f"{args.calls} calls x {args.minutes:g} min stereo 8 kHz speech, medians of "
            f"{args.repeats}": (COLUMNS, rows)
        },
        {
            "calls": args.calls,
            "minutes": args.minutes,
            "repeats": args.repeats,
            "median": summary,
            "runs": runs,
        },
        tools=("ffmpeg",),
        started=started,
    )


if __name__ == "__main__":
    main()
