"""What every benchmark script shares: the machine and versions it ran on, percentiles,
per-process CPU and memory from /proc, and one way to print the figures (a table for
people, one JSON line for tools)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

PACKAGES = ("callrec", "grpcio", "protobuf", "pjsua2-python", "pydub", "SQLAlchemy", "psycopg")
TOOLS = {
    "sipp": ["sipp", "-v"],
    "kamailio": ["kamailio", "-v"],
    "ffmpeg": ["ffmpeg", "-hide_banner", "-version"],
    "postgres": ["/usr/lib/postgresql/15/bin/postgres", "--version"],
}


# ---------------------------------------------------------------- where it ran


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, object]:
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)', os_release, re.M)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": pretty.group(1) if pretty else platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _tool_version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip()
    found = re.search(r"\d+\.\d+(\.\d+)?(-[\w.]+)?", text)
    return found.group(0) if found else None


def versions(tools: Iterable[str] = ()) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    for tool in tools:
        found[tool] = _tool_version(TOOLS[tool])
    return found


def command_line(module: str) -> str:
    return " ".join([f".venv/bin/python -m {module}", *sys.argv[1:]])


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was really measured."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Sample:
    pss_kb: int
    rss_kb: int
    cpu_ticks: int


def sample(pid: int) -> Sample | None:
    """PSS, RSS and user+system CPU ticks of one process (None once it is gone)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    pss = re.search(r"^Pss:\s+(\d+)", rollup, re.M)
    rss = re.search(r"^Rss:\s+(\d+)", rollup, re.M)
    return Sample(
        int(pss.group(1)) if pss else 0,
        int(rss.group(1)) if rss else 0,
        int(fields[11]) + int(fields[12]),
    )


def children(pid: int) -> list[int]:
    """The process and its direct children."""
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
    """(busy, total) jiffies of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass(frozen=True)
class Usage:
    pss_mb: float
    rss_mb: float
    cpu_pct: float  # of one core
    processes: int


def measure(groups: dict[str, list[int]], window: float) -> dict[str, Usage]:
    """Per group, summed over its processes: memory at the end of the window and CPU
    over it; ``host`` is the busy share of all cores (in %, 100 = every core busy)."""
    before = {name: {p: sample(p) for p in pids} for name, pids in groups.items()}
    busy0, total0 = host_busy()
    time.sleep(window)
    busy1, total1 = host_busy()
    result: dict[str, Usage] = {}
    for name, pids in groups.items():
        pss = rss = ticks = alive = 0
        for pid in pids:
            first, last = before[name][pid], sample(pid)
            if first is None or last is None:
                continue
            alive += 1
            pss, rss = pss + last.pss_kb, rss + last.rss_kb
            ticks += last.cpu_ticks - first.cpu_ticks
        result[name] = Usage(pss / 1024, rss / 1024, 100.0 * ticks / TICK / window, alive)
    host = 100.0 * (busy1 - busy0) / max(1, total1 - total0)
    result["host"] = Usage(0.0, 0.0, host, 0)
    return result


# ---------------------------------------------------------------- output


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def emit(
    benchmark: str,
    module: str,
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[object]]]],
    result: dict[str, object],
    tools: Iterable[str] = (),
    started: float | None = None,
) -> None:
    """Print the tables, then one JSON line with the machine, versions and command."""
    stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    header: dict[str, object] = {
        "benchmark": benchmark,
        "date": stamp,
        "command": command_line(module),
        "machine": machine(),
        "versions": versions(tools),
    }
    if started is not None:
        header["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\n# {benchmark} — {stamp}")
    print(f"# {header['command']}")
    info = header["machine"]
    assert isinstance(info, dict)
    print(f"# {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, {info['os']}")
    for title, (columns, rows) in tables.items():
        print(f"\n{title}\n{table(columns, rows)}")
    print()
    print(json.dumps({**header, "result": result}, default=str))
    sys.stdout.flush()
