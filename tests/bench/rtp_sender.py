"""Benchmark: what the load tests' RTP sender itself costs, against a sink of UDP
sockets on loopback (no recorder), so the recorder benchmarks can say the generator
was cheap and on time.

    .venv/bin/python -m tests.bench.rtp_sender                       # 100,400 calls, c,python
    .venv/bin/python -m tests.bench.rtp_sender --calls 400 --sender c --seconds 30

Per sender and step of N two-stream calls (2N streams, 100 N packets/s): the calls are
handed over through the FIFO as SIPp's exec does (one line per call, ``--rate`` calls/s),
then, with every stream running, the sender's CPU (% of one core, /proc/<pid>/stat of
the process, or of the sending thread for ``python``) over a window, its lateness behind
the 20 ms schedule (p50/p99/max over the ticks of the whole step), the packets the sink
received / the sender sent, and the host's load average (other work skews the figures).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.bench.common import emit, measure
from tests.support.pool import SENDERS, rtp_sender

MODULE = "tests.bench.rtp_sender"


@dataclass
class Result:
    sender: str
    calls: int
    cpu_pct: float
    late_p50_ms: float
    late_p99_ms: float
    late_max_ms: float
    sent: int
    received: int
    load_before: float
    load_during: float


def tone(path: Path, seconds: float) -> Path:
    """An 8 kHz mono 16-bit WAV (content is irrelevant to the cost)."""
    frame = b"".join(
        int(8000 * math.sin(i / 8000 * 2 * math.pi * 440)).to_bytes(2, "little", signed=True)
        for i in range(8000)
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(frame * math.ceil(seconds))
    return path


class Sink:
    """2 N bound UDP sockets, drained by one thread every 0.2 s, counting packets."""

    def __init__(self, streams: int) -> None:
        self.socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(streams)]
        for sock in self.socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()

    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.socks]

    def _drain(self) -> None:
        buffer = bytearray(2048)
        for sock in self.socks:
            with contextlib.suppress(BlockingIOError):
                while sock.recv_into(buffer):
                    self.received += 1

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._drain()
        for sock in self.socks:
            sock.close()


@contextlib.contextmanager
def sink(streams: int) -> Iterator[Sink]:
    found = Sink(streams)
    try:
        yield found
    finally:
        found.close()


def hand_over(fifo: Path, wav: Path, ports: list[int], rate: float) -> None:
    """One line per call into the FIFO, ``rate`` calls a second."""
    fd = os.open(fifo, os.O_WRONLY)
    started = time.monotonic()
    try:
        for n, (a, b) in enumerate(zip(ports[::2], ports[1::2], strict=True)):
            os.write(fd, f"127.0.0.1:{a}={wav} 127.0.0.1:{b}={wav}\n".encode())
            time.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
    finally:
        os.close(fd)


def run(root: Path, kind: str, calls: int, seconds: float, rate: float) -> Result:
    wav = tone(root / f"tone-{calls}.wav", seconds + calls / rate + 5)
    load_before = os.getloadavg()[0]
    with sink(2 * calls) as received:
        with rtp_sender(root, kind) as (fifo, sender):
            hand_over(fifo, wav, received.ports(), rate)
            time.sleep(1.0)
            usage = measure({"sender": sender.thread_ids()}, seconds)
            load_during = os.getloadavg()[0]
        late = sender.lateness()  # final: the sender has stopped
        time.sleep(0.5)  # the sink takes what is still queued
    return Result(
        kind, calls, usage["sender"].cpu_pct, late.p50_s * 1e3, late.p99_s * 1e3,
        late.max_s * 1e3, late.packets, received.received, load_before, load_during,
    )  # fmt: skip


COLUMNS = [
    "sender", "calls", "packets/s", "CPU % of a core", "late p50 ms", "late p99 ms",
    "late max ms", "received/sent", "load avg before", "load avg during",
]  # fmt: skip


def row(r: Result) -> list[object]:
    return [
        r.sender, r.calls, 100 * r.calls, r.cpu_pct, r.late_p50_ms, r.late_p99_ms,
        r.late_max_ms, f"{r.received / max(1, r.sent):.4f}", r.load_before, r.load_during,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", default="100,400", help="two-stream calls per step")
    parser.add_argument("--sender", default="c,python", help=f"of {', '.join(SENDERS)}")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window")
    parser.add_argument("--rate", type=float, default=100.0, help="calls handed over a second")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results: list[Result] = []
    for kind in args.sender.split(","):
        for calls in (int(n) for n in args.calls.split(",")):
            with tempfile.TemporaryDirectory(prefix="bench-rtp-sender-") as tmp:
                results.append(run(Path(tmp), kind, calls, args.seconds, args.rate))
            print(f"{kind} {calls}: {results[-1].cpu_pct:.1f} % of a core", flush=True)
    title = "RTP load sender against a UDP sink (CPU of the sender alone, lateness per tick)"
    output = {"seconds": args.seconds, "rate": args.rate, "results": [vars(r) for r in results]}
    emit("rtp sender", MODULE, {title: (COLUMNS, [row(r) for r in results])}, output, (), started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
