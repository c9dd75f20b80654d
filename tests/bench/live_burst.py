"""Benchmark: the live path's hang-up burst without the recorder in the way.

    .venv/bin/python -m tests.bench.live_burst --calls 400 --seconds 20 --rate 20

The agent's real live uplink (``LiveUplink``: its loop tailing every active capture each
``live_flush``, and ``finish`` on as many threads as the agent gives hang-ups) against a
real store in its own process (SQLite, files, port 0). ``--calls`` captures grow by
8 kHz 16-bit PCM on both legs in real time (a writer thread stands in for the workers:
no SIP, no RTP, so the recorder's CPU does not blur the figures); after ``--seconds``
they hang up ``--rate`` a second, as when a queue's calls end together. Measured per
call: hang-up (the capture's move to ``captures/ready``) → safe (``finish`` returned and
the capture is gone: the store answered ``finished``), p50/p99/max; the store's and the
agent's CPU seconds per call-minute; appends the store committed and in how many
catalog transactions; the legs' bytes sent per call-minute (G.711 A-law on the wire
since issue 19's left-over: 8 KB a second per leg, PCM's half). The archive (encoded
after the Finish) is not waited for.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import multiprocessing.connection as mpc
import resource
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from agent.capture import read_meta, write_meta
from agent.recorder.daemon import LIVE_FINISH_THREADS
from agent.recorder.uplink.live import LiveUplink
from tests.bench.common import emit, percentile
from tests.support.faults import write_capture
from tests.support.stack import InProcessStore, agent_config, make_keys, store_config

MODULE = "tests.bench.live_burst"
TICK_S = 0.2
BYTES_PER_TICK = int(16_000 * TICK_S)


def _serve(root: str, conn: mpc.Connection) -> None:
    """The store, in a process of its own (its own GIL, as in production)."""
    with InProcessStore(store_config(Path(root))) as store:
        conn.send(store.address)
        conn.recv()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send(usage.ru_utime + usage.ru_stime)


def _captures(data_dir: Path, keys_dir: Path, calls: int) -> list[Path]:
    """``calls`` two-leg captures in captures/active (a second of tone each, running)."""
    keys = make_keys(keys_dir)
    active = data_dir / "captures" / "active" / "w0"
    active.mkdir(parents=True, exist_ok=True)
    found = []
    for _ in range(calls):
        rid = write_capture(data_dir, keys, seconds=1)
        path = active / rid
        shutil.move(data_dir / "captures" / "ready" / rid, path)
        write_meta(path, dataclasses.replace(read_meta(path), ended_at=None))
        found.append(path)
    return found


def _grow(captures: list[Path], stop: threading.Event) -> None:
    """Every leg of every running capture grows in real time."""
    block = b"\1\0" * (BYTES_PER_TICK // 2)
    next_tick = time.monotonic()
    while not stop.is_set():
        for capture in list(captures):
            for leg in ("customer.wav", "employee.wav"):
                try:
                    with (capture / leg).open("ab") as fh:
                        fh.write(block)
                except FileNotFoundError:
                    continue  # hung up meanwhile
        next_tick += TICK_S
        stop.wait(max(0.0, next_tick - time.monotonic()))


def run(root: Path, calls: int, seconds: float, rate: float) -> dict[str, object]:
    here, there = mp.Pipe()
    store = mp.Process(target=_serve, args=(str(root / "store"), there), daemon=True)
    store.start()
    address = here.recv()
    keys = make_keys(root / "keys")
    (root / "agent").mkdir()
    config, _ = agent_config(root / "agent", keys, address, uplink={"live": True})
    captures = _captures(config.data_dir, root / "keys", calls)
    live = LiveUplink(config, grpc.insecure_channel(address))
    running = list(captures)
    stop = threading.Event()
    writer = threading.Thread(target=_grow, args=(running, stop), daemon=True)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    writer.start()
    live.start()
    time.sleep(seconds)
    safe: list[float] = []
    ready = config.captures_dir / "ready"

    def hang_up(capture: Path) -> None:
        meta = read_meta(capture)
        write_meta(capture, dataclasses.replace(meta, ended_at=meta.started_at))
        running.remove(capture)
        capture.rename(ready / capture.name)
        moved = time.monotonic()
        pool.submit(finish, capture.name, moved)

    def finish(rid: str, moved: float) -> None:
        live.finish(rid)
        if not (ready / rid).exists():
            safe.append(time.monotonic() - moved)

    with ThreadPoolExecutor(LIVE_FINISH_THREADS) as pool:
        for capture in captures:
            hang_up(capture)
            time.sleep(1 / rate)
    stop.set()
    live.stop()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    here.send("stop")
    store_cpu = float(here.recv())
    store.join(30)
    call_minutes = calls * (seconds + calls / rate / 2) / 60
    agent_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {
        "calls": calls,
        "safe": len(safe),
        "hangup_to_safe_p50_s": round(percentile(safe, 50), 3),
        "hangup_to_safe_p99_s": round(percentile(safe, 99), 3),
        "hangup_to_safe_max_s": round(max(safe, default=float("nan")), 3),
        "store_cpu_s_per_call_minute": round(store_cpu / call_minutes, 3),
        "agent_cpu_s_per_call_minute": round(agent_cpu / call_minutes, 3),
        "bytes_sent": live.bytes_sent,
        # the legs' bytes in the appends and finishes (gRPC's framing not counted)
        "wire_kb_per_call_minute": round(live.bytes_sent / 1024 / call_minutes, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=20.0, help="all calls up this long")
    parser.add_argument("--rate", type=float, default=20.0, help="hang-ups per second")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-live-burst-") as root:
        result = run(Path(root), args.calls, args.seconds, args.rate)
    columns = list(result)
    title = "Hang-up → safe, uplink and store only (no recorder)"
    emit("live hang-up burst", MODULE, {title: (columns, [[result[c] for c in columns]])}, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
