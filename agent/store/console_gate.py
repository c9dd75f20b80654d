"""Who is on the other end of the console socket: the kernel says (``SO_PEERCRED``).

grpc does not hand a service the credentials of a unix socket's peer, so the console's
socket (``console.sock``, mode 0600) is served by this small relay: it reads each
connection's peer credentials (pid, uid) and relays the bytes to the console's grpc
server on ``console.inner.sock`` (inside the 0700 data directory) from a socket bound
to an abstract name that carries them (``callrec-console-uid<uid>-pid<pid>-<nonce>``).
The grpc server sees that name as the call's peer; ``peer_of`` reads it back, with the
login the uid belongs to and the login uid of the session (``/proc/<pid>/loginuid``:
the person who logged in, even through ``sudo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from agent import logs

log = logs.get_logger(__name__)

_PEER = re.compile(r"unix-abstract:callrec-console-uid(\d+)-pid(\d+)-[0-9a-f]+")
_UNSET_LOGINUID = 4294967295


@dataclass(frozen=True)
class ConsolePeer:
    uid: int
    pid: int
    login: str  # the name of the session's login uid, else of the uid
    detail: str  # uid=… login_uid=… pid=…


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def peer_of(grpc_peer: str) -> ConsolePeer | None:
    """The console client's credentials from a grpc peer string (None: not relayed)."""
    match = _PEER.fullmatch(grpc_peer)
    if match is None:
        return None
    uid, pid = int(match.group(1)), int(match.group(2))
    try:
        login_uid = int(Path(f"/proc/{pid}/loginuid").read_text().strip())
    except (OSError, ValueError):
        login_uid = _UNSET_LOGINUID
    who = uid if login_uid == _UNSET_LOGINUID else login_uid
    detail = f"uid={uid} login_uid={'-' if who == uid else login_uid} pid={pid}"
    return ConsolePeer(uid, pid, _name(who), detail)


class ConsoleGate:
    def __init__(self, outer: Path, inner: Path) -> None:
        self.outer = outer
        self.inner = inner
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.outer.exists():
            self.outer.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._relay, str(self.outer))
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.outer.unlink()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            inner.bind(f"\0callrec-console-uid{uid}-pid{pid}-{secrets.token_hex(6)}")
            inner.setblocking(False)
            await asyncio.get_running_loop().sock_connect(inner, str(self.inner))
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner)
            await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.warning("console_relay_failed", error=type(exc).__name__)
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
