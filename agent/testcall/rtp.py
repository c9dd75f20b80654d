"""An RTP sender for tests: G.711 from WAV files, 20 ms packets, paced in real time,
many streams from ONE thread of ONE process (a process per call saturates a small
machine and costs the recordings audio; see FACTS.md).

Three ways to use it:

- in Python: ``RtpSender().start()``, then ``sender.add(("127.0.0.1", port), wav)``;
- as a command that sends and exits when its files are done (what a SIPp scenario
  launches with ``<exec command=…>`` once it has the ports from the 200's SDP)::

      python -m agent.testcall.rtp --to 127.0.0.1:40000=customer.wav \\
                                  --to 127.0.0.1:40002=employee.wav,src=41000

- as one long-lived server for many calls (``serve --control 127.0.0.1:PORT``, or
  :class:`ControlServer` in a test's own process) that scenarios reach with
  ``--via 127.0.0.1:PORT --to …``: the command then only hands its streams over.

A stream spec is ``HOST:PORT=FILE[,src=LOCALPORT]``; ``src`` binds the sending socket
to the port the SDP offered, as a real SRC does (symmetric RTP).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import random
import select
import socket
import struct
import threading
import time
import warnings
import wave
from dataclasses import dataclass, field
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # stdlib until 3.13; the project pins Python < 3.13

PTIME_S = 0.020
SAMPLES_PER_PACKET = 160  # 20 ms at 8 kHz
CODECS = {"pcma": (8, audioop.lin2alaw), "pcmu": (0, audioop.lin2ulaw)}


@dataclass(frozen=True)
class StreamSpec:
    host: str
    port: int
    path: Path
    src_port: int | None = None

    @classmethod
    def parse(cls, text: str) -> StreamSpec:
        """``HOST:PORT=FILE[,src=LOCALPORT]``."""
        target, sep, rest = text.partition("=")
        host, _, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{text!r}: expected HOST:PORT=FILE[,src=LOCALPORT]")
        path, _, option = rest.partition(",src=")
        return cls(host, int(port), Path(path), int(option) if option else None)

    def format(self) -> str:
        src = f",src={self.src_port}" if self.src_port else ""
        return f"{self.host}:{self.port}={self.path}{src}"


@dataclass(frozen=True)
class Lateness:
    """How far behind the 20 ms schedule a sender's ticks that sent something ran
    (seconds), so a late sender is never read as a recorder's loss."""

    ticks: int
    p50_s: float
    p99_s: float
    max_s: float
    packets: int

    @classmethod
    def of(cls, late_s: list[float], packets: int) -> Lateness:
        ordered = sorted(late_s)

        def rank(q: float) -> float:
            return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] if ordered else 0.0

        return cls(len(ordered), rank(50), rank(99), ordered[-1] if ordered else 0.0, packets)


def encode_wav(path: Path, codec: str = "pcma") -> list[bytes]:
    """The payloads (160 bytes each) of an 8 kHz mono 16-bit WAV file."""
    with wave.open(str(path), "rb") as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (8000, 1, 2):
            raise ValueError(f"{path}: expected 8 kHz mono 16-bit PCM")
        pcm = wav.readframes(wav.getnframes())
    encoded = CODECS[codec][1](pcm, 2)
    step = SAMPLES_PER_PACKET
    return [encoded[i : i + step].ljust(step, b"\xd5") for i in range(0, len(encoded), step)]


@dataclass
class _Stream:
    sock: socket.socket
    dest: tuple[str, int]
    payloads: list[bytes]
    payload_type: int
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    seq: int = field(default_factory=lambda: random.getrandbits(16))
    ts: int = field(default_factory=lambda: random.getrandbits(32))
    sent: int = 0

    def send_next(self) -> bool:
        """Send one packet; False when the file is done."""
        if self.sent >= len(self.payloads):
            return False
        second = (0x80 if self.sent == 0 else 0) | self.payload_type  # marker on the first
        header = struct.pack("!BBHII", 0x80, second, self.seq, self.ts, self.ssrc)
        # An ICMP unreachable from a receiver that went away must not stop the pace.
        with contextlib.suppress(OSError):
            self.sock.sendto(header + self.payloads[self.sent], self.dest)
        self.sent += 1
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + SAMPLES_PER_PACKET) & 0xFFFFFFFF
        return True


class RtpSender:
    """Paces every stream from one thread on a shared 20 ms clock."""

    def __init__(self, codec: str = "pcma") -> None:
        self.codec = codec
        self._lock = threading.Lock()
        self._streams: list[_Stream] = []
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="rtp-sender", daemon=True)
        self._cache: dict[Path, list[bytes]] = {}
        self.max_late_s = 0.0  # how far the pace ever fell behind (load tests report it)
        self.streams_added = 0
        self.packets = 0
        self._late_s: collections.deque[float] = collections.deque(maxlen=200_000)

    def add(self, spec: StreamSpec) -> None:
        payloads = self._cache.get(spec.path)
        if payloads is None:
            payloads = self._cache[spec.path] = encode_wav(spec.path, self.codec)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("", spec.src_port or 0))
        stream = _Stream(sock, (spec.host, spec.port), payloads, CODECS[self.codec][0])
        with self._lock:
            self._streams.append(stream)
            self.streams_added += 1
            self._idle.clear()

    def start(self) -> RtpSender:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def lateness(self) -> Lateness:
        """Lateness of the ticks that sent something, measured after their last packet."""
        return Lateness.of(list(self._late_s), self.packets)

    def thread_ids(self) -> list[int]:
        """The sending thread's id (its CPU is in ``/proc/<id>/stat``)."""
        return [self._thread.native_id] if self._thread.native_id else []

    def wait_idle(self, timeout: float) -> bool:
        """True once every stream added so far has been sent completely."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                streams = list(self._streams)
            done = [s for s in streams if not s.send_next()]
            if len(done) < len(streams):
                self.packets += len(streams) - len(done)
                self._late_s.append(max(0.0, time.monotonic() - next_tick))
            if done:
                with self._lock:
                    for stream in done:
                        self._streams.remove(stream)
                        stream.sock.close()
                    if not self._streams:
                        self._idle.set()
            next_tick += PTIME_S
            delay = next_tick - time.monotonic()
            self.max_late_s = max(self.max_late_s, -delay)
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -1.0:  # hopelessly behind (machine stalled): re-anchor
                next_tick = time.monotonic()
        with self._lock:
            for stream in self._streams:
                stream.sock.close()
            self._streams.clear()
            self._idle.set()


class ControlServer:
    """Takes stream specs (one datagram, specs separated by newlines) for a sender."""

    def __init__(self, sender: RtpSender, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sender = sender
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.address: tuple[str, int] = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtp-control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                if line.strip():
                    try:
                        self.sender.add(StreamSpec.parse(line.strip()))
                    except (OSError, ValueError) as exc:
                        print(f"rtp: refused {line!r}: {exc}", flush=True)


class FifoControl:
    """Takes stream specs (whitespace-separated, one line per call) written to a FIFO.

    What a load test's scenarios use: SIPp's ``exec`` then runs
    ``echo SPEC SPEC | tee -a FIFO`` (a few ms of CPU) instead of starting a Python
    process per call (~0.1 s of CPU each, which at 20 calls/s is both cores). Lines
    under PIPE_BUF bytes are written whole, so concurrent calls never interleave."""

    def __init__(self, sender: RtpSender, path: Path) -> None:
        self.sender = sender
        self.path = path
        os.mkfifo(path, 0o600)
        # Read and write: the FIFO never reports end-of-file and writers never block.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtp-fifo", daemon=True)

    def start(self) -> FifoControl:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        os.close(self._fd)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        pending = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if not ready:
                continue
            try:
                pending += os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            *lines, pending = pending.split(b"\n")
            for line in lines:
                for spec in line.decode(errors="replace").split():
                    try:
                        self.sender.add(StreamSpec.parse(spec))
                    except (OSError, ValueError) as exc:
                        print(f"rtp: refused {spec!r}: {exc}", flush=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.testcall.rtp")
    parser.add_argument("command", nargs="?", choices=("send", "serve"), default="send")
    parser.add_argument("--to", action="append", default=[], type=StreamSpec.parse)
    parser.add_argument("--codec", choices=sorted(CODECS), default="pcma")
    parser.add_argument("--via", type=_address, help="hand the streams to a running server")
    parser.add_argument("--control", type=_address, help="serve: the control address")
    parser.add_argument("--pidfile", type=Path)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.via:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(s.format() for s in args.to).encode(), args.via)
        return 0
    if args.pidfile:
        args.pidfile.write_text(f"{os.getpid()}\n")
    sender = RtpSender(args.codec).start()
    for spec in args.to:
        sender.add(spec)
    if args.command == "serve":
        server = ControlServer(sender, *(args.control or ("127.0.0.1", 0))).start()
        print(f"control {server.address[0]}:{server.address[1]}", flush=True)
        time.sleep(args.max_seconds)
        server.stop()
    else:
        sender.wait_idle(args.max_seconds)
    sender.stop()
    sender.join(2.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
