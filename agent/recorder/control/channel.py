"""The agent's way to a worker's calls: one Linux abstract unix socket per worker, one
JSON line in and one out per connection.

The worker serves it from its pjsua2 loop (:meth:`ControlChannel.serve`, non-blocking,
between two turns of ``libHandleEvents``): the command runs on the thread that owns
pjsua2. The agent then wakes the loop out of its wait with a SIP keep-alive (CRLF CRLF)
to the worker's SIP port, which pjsip ignores; without it the loop's own timeout
(``ACTIVE_POLL_MS`` while it has calls) bounds the wait. An abstract socket has no
file permissions, so the worker takes only connections from processes of its own user
(``SO_PEERCRED``). Requests are
bounded (``MAX_LINE`` bytes, ``READ_TIMEOUT_S`` to arrive, ``BACKLOG`` waiting).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import logs

log = logs.get_logger(__name__)

MAX_LINE = 8192
READ_TIMEOUT_S = 0.2
BACKLOG = 16
MAX_PER_TURN = 16  # connections served per loop turn (the rest wait for the next)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def channel_name(captures_dir: Path, index: int) -> str:
    """The abstract socket's name: one per agent data directory and worker slot."""
    digest = hashlib.sha256(str(captures_dir.resolve()).encode()).hexdigest()[:16]
    return f"\0callrec-control-{digest}-w{index}"


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _read_line(conn: socket.socket) -> bytes:
    """One request line, at most MAX_LINE bytes, arriving within READ_TIMEOUT_S."""
    conn.settimeout(READ_TIMEOUT_S)
    data = b""
    while b"\n" not in data:
        block = conn.recv(MAX_LINE + 1 - len(data))
        if not block:
            break
        data += block
        if len(data) > MAX_LINE:
            raise ValueError(f"request longer than {MAX_LINE} bytes")
    return data.split(b"\n", 1)[0]


def _send(conn: socket.socket, doc: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(READ_TIMEOUT_S)
        conn.sendall(json.dumps(doc).encode() + b"\n")


class ControlChannel:
    """The worker's end: bound at start, served from the worker's loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(name)
        self._sock.listen(BACKLOG)
        self._sock.setblocking(False)
        self._uid = os.getuid()

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve(self, handler: Handler) -> int:
        """Answer the connections waiting now; returns how many were served."""
        served = 0
        while served < MAX_PER_TURN:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            served += 1
            with conn:
                self._serve_one(conn, handler)
        return served

    def _serve_one(self, conn: socket.socket, handler: Handler) -> None:
        if _peer_uid(conn) != self._uid:
            log.warning("control_peer_refused", reason="another user")
            return
        try:
            request = json.loads(_read_line(conn))
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
        except (OSError, ValueError) as exc:
            _send(conn, {"status": 400, "error": f"bad request: {exc}"})
            return
        try:
            reply = handler(request)
        except Exception as exc:  # one bad command never leaves the loop
            log.exception("control_command_failed", op=str(request.get("op", "-"))[:20])
            reply = {"status": 500, "error": f"{type(exc).__name__}"}
        _send(conn, reply)

    def close(self) -> None:
        self._sock.close()


def wake(sip: tuple[str, int]) -> None:
    """Wake a worker's loop out of its wait: a SIP keep-alive (CRLF CRLF, RFC 5626) to
    its SIP port, which pjsip reads and ignores; the loop then serves the channel."""
    anywhere = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - a listen address, mapped
    address = anywhere.get(sip[0], sip[0])
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as udp:
        udp.sendto(b"\r\n\r\n", (address, sip[1]))


def ask_worker(
    name: str, request: dict[str, Any], timeout_s: float = 2.0, sip: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Send one command to a worker (woken through ``sip``, its SIP address, if given)
    and return its reply; OSError/ValueError when the worker can't be reached or
    answers nonsense."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(name)
        sock.sendall(json.dumps(request).encode() + b"\n")
        if sip is not None:
            with contextlib.suppress(OSError):  # the loop's own timeout still serves it
                wake(sip)
        data = b""
        while b"\n" not in data and len(data) <= MAX_LINE * 4:
            block = sock.recv(65536)
            if not block:
                break
            data += block
    reply = json.loads(data.split(b"\n", 1)[0] or b"null")
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), int):
        raise ValueError("the worker's reply is not a control reply")
    return reply
