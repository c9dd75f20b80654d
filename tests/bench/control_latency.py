"""Benchmark: from a control API pause to the first silent frame in the recording.

The real agent (Kamailio front, one pjsua2 worker), the store, SIPp as the SRC sending a
steady tone on each stream (440 Hz customer, 1000 Hz employee), the control API with a
token. Each call is paused and resumed every ``--every`` seconds through
``POST /calls/pause`` by extension; the stored recording (WAV, no codec smear) is then
read in 5 ms windows: a pause's latency is where the customer's tone first falls to
the floor, minus when the request was sent (both from the call's answer). Also: the
API's round trip (request sent to answer read).

    .venv/bin/python -m tests.bench.control_latency --calls 2
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from agent.testcall.sipp import SiprecCall
from tests.bench.common import emit, percentile
from tests.support.audio import decode
from tests.support.pool import Pool, epoch
from tests.test_control import Api, running_control
from tests.test_spool import tone, wav

MODULE = "tests.bench.control_latency"
WINDOW_S = 0.005
FLOOR_RMS = 30


def _rms(samples: Sequence[int]) -> float:
    return math.sqrt(sum(v * v for v in samples) / max(1, len(samples)))


def first_silence(audio: tuple[int, Sequence[int]], after_s: float) -> float | None:
    """Offset (s) of the first 5 ms window of channel 0 at the floor after ``after_s``."""
    channels, samples = audio
    mono = samples[0::channels]
    step = int(WINDOW_S * 8000)
    start = max(0, int(after_s * 8000))
    for i in range(start, len(mono) - step, step):
        if _rms(mono[i : i + step]) < FLOOR_RMS:
            return i / 8000
    return None


def one_call(
    api: Api, pool: Pool, call: SiprecCall, seconds: int, every: float
) -> tuple[list[float], str]:
    """Place one call, pause/resume it on a schedule; returns the times each pause
    request was sent and answered, and the call's Call-ID."""
    sent: list[float] = []
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(pool.place, call, "bench", 60)
        live = api.live("1001")
        started = epoch(live["started_at"])
        at = 2.0
        while at + every < seconds - 1:
            time.sleep(max(0.0, started + at - time.time()))
            sent.append(time.time())
            status, _ = api.request("POST", "/calls/pause", {"extension": "1001"})
            assert status == 200
            sent.append(time.time())
            time.sleep(max(0.0, started + at + every / 2 - time.time()))
            assert api.request("POST", "/calls/resume", {"extension": "1001"})[0] == 200
            at += every
        result = future.result()
    assert result.ok and result.call_id is not None, result.errors[-1000:]
    return sent, result.call_id


def run(args: argparse.Namespace, root: Path) -> dict[str, object]:
    tones = root / "tones"
    tones.mkdir()
    (tones / "c.wav").write_bytes(wav(tone(440, args.seconds + 5)))
    (tones / "e.wav").write_bytes(wav(tone(1000, args.seconds + 5, amp=6000)))
    latencies: list[float] = []
    round_trips: list[float] = []
    with running_control(root / "run", audio={"format": "wav"}) as (pool, token):
        api = Api(pool, token)
        for n in range(args.calls):
            call = replace(
                pool.call(call_ms=args.seconds * 1000),
                customer_wav=tones / "c.wav", employee_wav=tones / "e.wav",
            )  # fmt: skip
            sent, call_id = one_call(api, pool, call, args.seconds, args.every)
            row = pool.stored(call_id)
            audio = decode(pool.export(row, root / f"call{n}.wav"))
            started = row.started_at_ms / 1000
            for request, answered in zip(sent[0::2], sent[1::2], strict=True):
                offset = request - started
                silent = first_silence(audio, offset - 0.2)
                assert silent is not None, offset
                latencies.append((silent - offset) * 1000)
                round_trips.append((answered - request) * 1000)
    return {
        "pauses": len(latencies),
        "first_silent_frame_ms": _summary(latencies),
        "api_round_trip_ms": _summary(round_trips),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 1),
        "p95": round(percentile(values, 95), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2, help="calls, one after the other")
    parser.add_argument("--seconds", type=int, default=30, help="length of each call")
    parser.add_argument("--every", type=float, default=4.0, help="a pause every … s")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="control-bench-") as tmp:
        result = run(args, Path(tmp))
    rows = [
        [name, *(result[name][k] for k in ("p50", "p95", "max", "min"))]  # type: ignore[index]
        for name in ("first_silent_frame_ms", "api_round_trip_ms")
    ]
    table = {"Pause latency": (["measure", "p50", "p95", "max", "min"], rows)}
    emit("control latency", MODULE, table, result, tools=("sipp", "kamailio"), started=started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
