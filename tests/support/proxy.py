"""A small TCP proxy on loopback for fault tests: it sits between the agent and the
store and can slow the upload down, cut the connection after N bytes, or flip a byte.

Bounded: every socket has a timeout, and the proxy stops by itself after
``lifetime_s`` (or when the test leaves the ``with`` block).

Flipping a byte *inside a gRPC message* needs the clear-text HTTP/2 stream: the proxy
then follows the frames (RFC 9113 §4.1) and the gRPC length prefixes of the DATA
payload and flips one byte in the middle of the next large message (a chunk's audio
bytes), so the store gets wrong data, not a broken protocol. Over TLS a flipped byte
can only break the TLS record (``flip_raw_at``).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA_FRAME = 0x0
BIG_MESSAGE = 32 * 1024  # only chunk messages are this large
FLIP_AT = 1000  # byte of the message body to flip (well inside the audio bytes)


@dataclass
class _GrpcStream:
    """Where we are in one HTTP/2 stream's gRPC messages (5-byte prefix + body)."""

    prefix: bytearray = field(default_factory=bytearray)
    body_left: int = 0
    body_pos: int = 0
    body_len: int = 0


class GrpcFlipper:
    """Follows client→server HTTP/2 frames and flips one byte of one big gRPC message."""

    def __init__(self) -> None:
        self.preface_left = len(PREFACE)
        self.header = bytearray()
        self.frame_left = 0
        self.frame_type = 0
        self.stream_id = 0
        self.streams: dict[int, _GrpcStream] = {}
        self.armed = False
        self.flipped = 0

    def feed(self, buf: bytearray) -> None:
        i = 0
        while i < len(buf):
            if self.preface_left:
                step = min(self.preface_left, len(buf) - i)
                self.preface_left -= step
                i += step
            elif self.frame_left == 0:
                self.header.append(buf[i])
                i += 1
                if len(self.header) == 9:
                    self.frame_left = int.from_bytes(self.header[0:3], "big")
                    self.frame_type = self.header[3]
                    self.stream_id = int.from_bytes(self.header[5:9], "big") & 0x7FFFFFFF
                    self.header.clear()
            else:
                step = min(self.frame_left, len(buf) - i)
                if self.frame_type == DATA_FRAME:
                    self._data(buf, i, step)
                self.frame_left -= step
                i += step

    def _data(self, buf: bytearray, start: int, length: int) -> None:
        stream = self.streams.setdefault(self.stream_id, _GrpcStream())
        i, end = start, start + length
        while i < end:
            if stream.body_left == 0:
                stream.prefix.append(buf[i])
                i += 1
                if len(stream.prefix) == 5:
                    stream.body_len = stream.body_left = int.from_bytes(stream.prefix[1:5], "big")
                    stream.body_pos = 0
                    stream.prefix.clear()
                continue
            step = min(stream.body_left, end - i)
            target = FLIP_AT - stream.body_pos
            if self.armed and stream.body_len >= BIG_MESSAGE and 0 <= target < step:
                buf[i + target] ^= 0xFF
                self.armed = False
                self.flipped += 1
            stream.body_pos += step
            stream.body_left -= step
            i += step


class TcpProxy:
    """``with TcpProxy(target_port) as proxy:`` then point the client at ``proxy.port``."""

    def __init__(
        self, target_port: int, rate_bytes_s: float | None = None, lifetime_s: float = 180.0
    ) -> None:
        self.target = ("127.0.0.1", target_port)
        self.rate_bytes_s = rate_bytes_s
        self.lifetime_s = lifetime_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.bytes_up = 0
        self.connections = 0
        self.cuts = 0
        self.flips = 0
        self._cut_after: int | None = None
        self._down_until = 0.0  # a network cut: until then no connection gets through
        self._flip_grpc = False
        self._flip_raw_at: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ arming faults

    def cut_after(self, n_bytes: int) -> None:
        """Cut the connection carrying the upload once ``n_bytes`` more went up."""
        with self._lock:
            self._cut_after = self.bytes_up + n_bytes

    def cut_for(self, seconds: float) -> None:
        """A network cut: every connection is dropped (RST) and new ones are closed at
        once for ``seconds``."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            self.cuts += 1

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def flip_in_grpc_message(self) -> None:
        """Flip one byte inside the next big gRPC message (clear-text HTTP/2 only)."""
        with self._lock:
            self._flip_grpc = True

    def flip_raw_at(self, n_bytes: int) -> None:
        """Flip the byte ``n_bytes`` further up the stream, whatever it is (TLS)."""
        with self._lock:
            self._flip_raw_at = self.bytes_up + n_bytes

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> TcpProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.listener.close()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            if self.down:
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()  # the store is down: the client sees a refused stream
                continue
            self.connections += 1
            self._spawn(self._relay, client, upstream, deadline)
        self._stop.set()

    # ------------------------------------------------------------ relaying

    def _relay(self, client: socket.socket, upstream: socket.socket, deadline: float) -> None:
        flipper = GrpcFlipper()
        peers = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                if self.down:
                    return
                for sock in readable:
                    data = bytearray(sock.recv(16 * 1024))
                    if not data:
                        return
                    if sock is client and not self._upstream(data, flipper):
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                _hard_close(sock)

    def _upstream(self, data: bytearray, flipper: GrpcFlipper) -> bool:
        """Count, maybe corrupt, maybe throttle the client's bytes; False: cut now."""
        with self._lock:
            start = self.bytes_up
            self.bytes_up += len(data)
            if self._flip_grpc:
                flipper.armed, self._flip_grpc = True, False
            if self._flip_raw_at is not None and start <= self._flip_raw_at < self.bytes_up:
                data[self._flip_raw_at - start] ^= 0xFF
                self._flip_raw_at = None
                self.flips += 1
            if self._cut_after is not None and self.bytes_up >= self._cut_after:
                self._cut_after = None
                self.cuts += 1
                return False
        before = flipper.flipped
        flipper.feed(data)
        if flipper.flipped != before:
            with self._lock:
                self.flips += 1
        if self.rate_bytes_s:
            time.sleep(len(data) / self.rate_bytes_s)
        return True


def _hard_close(sock: socket.socket) -> None:
    """Close with RST, like a connection a middlebox dropped."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
