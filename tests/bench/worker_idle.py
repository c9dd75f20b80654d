"""Benchmark: what an idle recorder worker costs, workers started the old way (``exec``:
each its own Python) and the new (``fork``: from the pre-imported zygote), back to back.

    .venv/bin/python -m tests.bench.worker_idle                     # 8 workers, 30 s
    .venv/bin/python -m tests.bench.worker_idle --workers 24 --seconds 60

For each way a fresh store and agent with N workers behind its Kamailio, no calls; after
the pool is up and settled, over the window:

- memory per worker from ``/proc/<pid>/smaps_rollup``: PSS (its share of every page it
  maps, the zygote's shared heap divided among its users) and USS (private pages: what
  one more worker adds); the zygote's own PSS (paid once per host);
- CPU per worker in % of one core from every thread's ``schedstat`` (nanoseconds on
  CPU, not 10 ms ticks: an idle worker is below the tick's resolution), and each
  pjsua thread's wake-ups per second (voluntary context switches): where idle CPU goes.

The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import emit
from tests.bench.concurrent import pool_keys
from tests.support.pool import running_pool

MODULE = "tests.bench.worker_idle"
WAYS = ("exec", "fork")


@dataclass
class Idle:
    way: str
    workers: int
    pss_mb: list[float] = field(default_factory=list)
    uss_mb: list[float] = field(default_factory=list)
    cpu_pct: list[float] = field(default_factory=list)
    wakeups: dict[str, float] = field(default_factory=dict)  # per thread name, per worker
    zygote_pss_mb: float = 0.0
    load: float = 0.0


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, USS) in kB."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    found = dict(re.findall(r"^(\w+):\s+(\d+) kB", rollup, re.M))
    return int(found["Pss"]), int(found["Private_Clean"]) + int(found["Private_Dirty"])


def threads(pid: int) -> dict[str, tuple[int, int]]:
    """Per thread (name#tid): nanoseconds on CPU, voluntary context switches."""
    found: dict[str, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            on_cpu = int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text()
        except OSError:
            continue
        switches = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)
        found[f"{name}#{task.name}"] = (on_cpu, int(switches.group(1)) if switches else 0)
    return found


def measure(way: str, pids: list[int], zygote: int | None, window: float) -> Idle:
    idle = Idle(way, len(pids))
    before = {pid: threads(pid) for pid in pids}
    time.sleep(window)
    wakeups: dict[str, float] = defaultdict(float)
    for pid in pids:
        after = threads(pid)
        ns = sum(after[t][0] - before[pid][t][0] for t in after if t in before[pid])
        idle.cpu_pct.append(100.0 * ns / 1e9 / window)
        for t, (_, switches) in after.items():
            if t in before[pid]:
                name = "main" if t.startswith(("python", "callrec-w")) else t.split("#")[0]
                wakeups[name] += (switches - before[pid][t][1]) / window / len(pids)
        pss, uss = memory_kb(pid)
        idle.pss_mb.append(pss / 1024)
        idle.uss_mb.append(uss / 1024)
    idle.wakeups = dict(wakeups)
    idle.zygote_pss_mb = memory_kb(zygote)[0] / 1024 if zygote else 0.0
    idle.load = os.getloadavg()[0]
    return idle


def run_way(root: Path, way: str, workers: int, window: float, settle: float) -> Idle:
    with running_pool(root / way, workers, sender="c", **pool_keys(way)) as pool:
        pool.wait_idle(timeout=60.0 + workers)
        time.sleep(settle)
        text = pool.text()
        zygote = re.findall(r"event=zygote_started pid=(\d+)", text)
        return measure(
            way, list(pool.worker_pids().values()), int(zygote[-1]) if zygote else None, window
        )


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="the measuring window")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after start-up")
    parser.add_argument(
        "--ways", default=",".join(WAYS),
        help="exec, fork or both; +thread / +loop: [sip] media_thread = true / false",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    results: list[Idle] = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-idle-") as tmp:
        for way in args.ways.split(","):
            results.append(run_way(Path(tmp), way, args.workers, args.seconds, args.settle))
    names = sorted({n for r in results for n in r.wakeups})
    cost = [
        [r.way, r.workers, mean(r.pss_mb), mean(r.uss_mb), r.zygote_pss_mb,
         mean(r.pss_mb) + r.zygote_pss_mb / max(1, r.workers), mean(r.cpu_pct),
         max(r.cpu_pct, default=float("nan")), r.load]
        for r in results
    ]  # fmt: skip
    wake = [[r.way, *(r.wakeups.get(n, 0.0) for n in names)] for r in results]
    tables = {
        "One idle worker (mean over the pool)": (
            ["start", "workers", "PSS MB", "USS MB", "zygote PSS MB", "PSS + zygote share MB",
             "CPU % of a core", "max CPU %", "load avg"],
            cost,
        ),
        "Wake-ups per second of one idle worker, per thread": (["start", *names], wake),
    }  # fmt: skip
    result = {
        "workers": args.workers,
        "window_s": args.seconds,
        "ways": {
            r.way: {
                "pss_mb": round(mean(r.pss_mb), 2),
                "uss_mb": round(mean(r.uss_mb), 2),
                "zygote_pss_mb": round(r.zygote_pss_mb, 2),
                "cpu_pct": round(mean(r.cpu_pct), 4),
                "cpu_pct_max": round(max(r.cpu_pct, default=float("nan")), 4),
                "wakeups_per_s": {k: round(v, 1) for k, v in r.wakeups.items()},
                "load_average": round(r.load, 2),
                "processes": len(r.pss_mb),
            }
            for r in results
        },
    }
    emit("idle worker", MODULE, tables, result, ("kamailio",), started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
