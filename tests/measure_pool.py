"""Measure what the recorder pool costs on this host, and whether it sustains a load.

    .venv/bin/python -m tests.measure_pool --workers 8 --calls 32 --seconds 30

Starts the store and the agent (N workers behind its own Kamailio), measures every
worker, Kamailio and the agent idle, then places CALLS two-stream SIPREC calls with
real speech (one SIPp, 10 calls/s; RTP from one sender in this process), measures
again while all are up, and checks that every call reached the store whole: its
length, both channels non-silent (finalize flags silence), no flag at all.

Memory is PSS (shared pages split among the processes sharing them) and RSS from
``/proc/PID/smaps_rollup``; CPU is user+system time over the window, in % of one core;
the host's busy share of all cores comes from ``/proc/stat``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agent.testcall.sipp import siprec_scenario
from agent.testcall.speech import Speech, make_speech
from tests.support.pool import Pool, flags, running_pool

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    pss_kb: int
    rss_kb: int
    cpu_ticks: int


def sample(pid: int) -> Sample:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    pss = int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"^Rss:\s+(\d+)", rollup, re.M).group(1))  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return Sample(pss, rss, int(fields[11]) + int(fields[12]))


def children(pid: int) -> list[int]:
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def host_busy() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def measure(groups: dict[str, list[int]], window: float) -> dict[str, tuple[float, float, float]]:
    """Per group: (PSS MB, RSS MB, CPU % of one core) summed over its processes."""
    before = {name: [sample(p) for p in pids] for name, pids in groups.items()}
    busy0, total0 = host_busy()
    time.sleep(window)
    busy1, total1 = host_busy()
    result: dict[str, tuple[float, float, float]] = {}
    for name, pids in groups.items():
        after = [sample(p) for p in pids]
        ticks = sum(a.cpu_ticks - b.cpu_ticks for a, b in zip(after, before[name], strict=True))
        result[name] = (
            sum(a.pss_kb for a in after) / 1024,
            sum(a.rss_kb for a in after) / 1024,
            100.0 * ticks / TICK / window,
        )
    result["host (all cores)"] = (0.0, 0.0, 100.0 * (busy1 - busy0) / max(1, total1 - total0))
    return result


def report(title: str, figures: dict[str, tuple[float, float, float]], workers: int) -> None:
    print(f"\n{title}")
    for name, (pss, rss, cpu) in figures.items():
        if name == "workers":
            print(f"  per worker (mean of {workers})  PSS {pss / workers:6.1f} MB  "
                  f"RSS {rss / workers:6.1f} MB  CPU {cpu / workers:5.2f} %")  # fmt: skip
        elif name.startswith("host"):
            print(f"  {name:28s} CPU {cpu:5.1f} %")
        else:
            print(f"  {name:28s} PSS {pss:6.1f} MB  RSS {rss:6.1f} MB  CPU {cpu:5.2f} %")


def groups_of(pool: Pool) -> dict[str, list[int]]:
    front = int(re.findall(r"event=front_started pid=(\d+)", pool.text())[-1])
    return {
        "workers": list(pool.worker_pids().values()),
        "kamailio (all processes)": children(front),
        "agent main process": [pool.agent.process.pid] if pool.agent.process else [],
    }


def long_speech(directory: Path, seconds: int) -> Speech:
    """The test speech repeated to last a whole call (the sender plays a file once)."""
    speech = make_speech(directory)
    looped = []
    for path in (speech.customer, speech.employee):
        target = path.with_name(f"long-{path.name}")
        times = str(seconds // 7 + 1)
        subprocess.run(["sox", str(path), str(target), "repeat", times], check=True, timeout=60)
        looped.append(target)
    return Speech(*looped)


def run(workers: int, calls: int, seconds: int, root: Path) -> bool:
    speech = long_speech(root / "speech", seconds)
    with running_pool(root, workers, speech, rtp_timeout="10s") as pool:
        return _load(pool, workers, calls, seconds)


def _load(pool: Pool, workers: int, calls: int, seconds: int) -> bool:
    pool.wait_idle()
    report("idle", measure(groups_of(pool), 10.0), workers)
    call = pool.call(call_ms=seconds * 1000, rtp_bind=False, accept_refusal=True)
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(
            pool.run, siprec_scenario(call), "measure", calls=calls, rate=10,
            timeout_s=seconds + 60,
        )  # fmt: skip
        time.sleep(calls / 10 + 3)
        window = max(5.0, seconds - calls / 10 - 8)
        report(f"busy: {calls} calls up", measure(groups_of(pool), window), workers)
        result = future.result()
    answered = [c.call_id for c in result.calls.values() if c.answered_at]
    rows = pool.stored_many(answered, timeout=120) if answered else {}
    bad = [r for r in rows.values() if flags(r) or abs(r.duration_ms - seconds * 1000) > 500]
    print(f"\n{len(answered)}/{calls} answered, {len(rows)} stored, {len(bad)} flagged or short")
    for row in bad[:5]:
        print(f"  {row.recording_id} duration_ms={row.duration_ms} flags={row.flags}")
    return len(answered) == calls and len(rows) == calls and not bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.measure_pool")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=30, help="length of each call")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="measure-pool-") as tmp:
        ok = run(args.workers, args.calls, args.seconds, Path(tmp))
    print("sustained" if ok else "NOT sustained")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
