"""Log records to journald as structured entries (systemd's native journal protocol,
https://systemd.io/JOURNAL_NATIVE_PROTOCOL/), so that ``journalctl RECORDING_ID=…``
finds a recording's lines.

Each record is one datagram of ``KEY=value\\n`` fields (a value holding a newline in
the binary-safe form: ``KEY\\n``, its length as 64-bit little-endian, the value,
``\\n``): ``MESSAGE`` (the line as it would go to stdout, without time stamp),
``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``LOGGER``, ``EVENT`` and each of the event's
fields upper-cased (``RECORDING_ID``, ``CALL_REF`` …), text redacted like the line.
A record too big for a datagram goes as a sealed memfd (as sd_journal_send does).
When the socket cannot be reached the line goes to the fallback stream instead.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import TextIO

from agent.logs import JOURNAL_SOCKET, NotPersonal, event_of, render_line, syslog_priority
from agent.redaction import redact_numbers

# Fields we set ourselves, and journald's own: an event field of the same name is
# sent as CALLREC_<NAME>.
_OURS = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
        "LOGGER",
        "EVENT",
        "ERRNO",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "DOCUMENTATION",
        "INVOCATION_ID",
        "USER_INVOCATION_ID",
        "TID",
    }
)


def field_value(value: object) -> str:
    """An event field as journald keeps it: raw text (no logfmt quoting), redacted."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, NotPersonal):
        return str(value)
    return redact_numbers(str(value))


def encode_entry(fields: list[tuple[str, str]]) -> bytes:
    """The native protocol's serialisation of ``fields`` (in order)."""
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """A handler that sends each record to journald's native socket at ``path``."""

    def __init__(
        self,
        identifier: str,
        path: Path = JOURNAL_SOCKET,
        fallback: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.fallback = fallback or sys.stdout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def entry(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        event, fields = event_of(record)
        entry = [
            ("MESSAGE", render_line(record)),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("EVENT", event),
        ]
        for key, value in fields.items():
            name = key.upper()
            entry.append((f"CALLREC_{name}" if name in _OURS else name, field_value(value)))
        return entry

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = encode_entry(self.entry(record))
            try:
                self._sock.sendto(payload, str(self.path))
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_memfd(payload)
        except OSError:
            line = render_line(record)
            self.fallback.write(f"<{syslog_priority(record.levelno)}>{line}\n")
            self.fallback.flush()
        except Exception:  # noqa: BLE001 - logging never raises into the caller
            self.handleError(record)

    def _send_memfd(self, payload: bytes) -> None:
        """A big entry: written to a sealed memfd whose descriptor is sent instead."""
        fd = os.memfd_create("callrec-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd]).tobytes()
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, str(self.path)
            )
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()
