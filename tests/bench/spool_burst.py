"""Benchmark: a burst of PBX recordings into the spool pickup, with bounded memory.

Writes N recordings (audio + sidecar) into a staging directory, renames them all into
the spool as fast as it can (the burst), and times the real SpoolPickup (watchdog
observer, index, conversion) until every one is a capture in captures/ready. Peak RSS
is sampled every 20 ms from /proc/self/status (pickup and writer share this process).

    .venv/bin/python -m tests.bench.spool_burst --files 1000
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

from agent.recorder.spool.pickup import SpoolPickup
from tests.bench.common import emit
from tests.support.stack import agent_config, make_keys
from tests.test_spool import sidecar, tone, wav

MODULE = "tests.bench.spool_burst"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stage(staging: Path, n: int, seconds: float, codec: str, layout: str) -> int:
    """Write n distinct recordings into ``staging``; returns the bytes written."""
    base = wav(tone(440, seconds), codec=codec)
    other = wav(tone(1000, seconds, amp=2000), codec=codec)
    total = 0
    for i in range(n):
        tag = struct.pack("<I", i)  # distinct audio per call, so dedup keeps all
        if layout == "pair":
            files = {f"b{i}-r.wav": base[:-4] + tag, f"b{i}-t.wav": other}
            audio = {"customer": f"b{i}-r.wav", "employee": f"b{i}-t.wav"}
        else:
            files = {f"b{i}.wav": base[:-4] + tag}
            audio = {"mixed": f"b{i}.wav"}
        files[f"b{i}.json"] = sidecar(f"bench-{i}", audio)
        for name, data in files.items():
            (staging / name).write_bytes(data)
            total += len(data)
    return total


def run(args: argparse.Namespace, root: Path) -> dict[str, object]:
    keys = make_keys(root / "keys")
    spool_dir, staging = root / "spool", root / "staging"
    spool_dir.mkdir()
    staging.mkdir()
    spool = {"dir": str(spool_dir), "settle": f"{args.settle}s", "orphan_timeout": "10m"}
    cfg, _ = agent_config(root, keys, "127.0.0.1:9", spool=spool)
    total = stage(staging, args.files, args.seconds, args.codec, args.layout)
    names = sorted(p.name for p in staging.iterdir())
    pickup = SpoolPickup.from_config(cfg)
    pickup.start()
    ready = cfg.captures_dir / "ready"
    time.sleep(0.5)
    base = rss_kib()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak.append(rss_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    for name in names:  # audio before sidecars: the order MixMonitor's command gives
        if not name.endswith(".json"):
            (staging / name).rename(spool_dir / name)
    for name in names:
        if name.endswith(".json"):
            (staging / name).rename(spool_dir / name)
    burst_s = time.monotonic() - t0
    while len(os.listdir(ready)) < args.files:
        if time.monotonic() - t0 > args.timeout:
            raise SystemExit(f"timeout: {len(os.listdir(ready))}/{args.files} taken")
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    done.set()
    sampler.join()
    pickup.stop()
    pickup.join(10)
    quarantined = [p for p in cfg.quarantine_dir.iterdir() if p.is_dir()]
    return {
        "recordings": args.files,
        "files": len(names),
        "layout": args.layout,
        "codec": args.codec,
        "audio_s_per_recording": args.seconds,
        "input_mb": round(total / 1e6, 1),
        "settle_s": args.settle,
        "rename_burst_s": round(burst_s, 3),
        "elapsed_s": round(elapsed, 2),
        "recordings_per_s": round(args.files / elapsed, 1),
        "files_per_s": round(len(names) / elapsed, 1),
        "rss_before_mib": round(base / 1024, 1),
        "rss_peak_mib": round(max(peak) / 1024, 1),
        "rss_growth_mib": round((max(peak) - base) / 1024, 1),
        "quarantined": len(quarantined),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="recordings in the burst")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio per recording")
    parser.add_argument("--codec", choices=("pcm", "alaw", "ulaw"), default="alaw")
    parser.add_argument("--layout", choices=("mixed", "pair"), default="pair")
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="spool-bench-") as tmp:
        result = run(args, Path(tmp))
    rows = [[key, value] for key, value in result.items()]
    emit("spool burst", MODULE, {"Spool pickup burst": (["metric", "value"], rows)}, result,
         started=started)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
