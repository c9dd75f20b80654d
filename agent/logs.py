"""Logging for the daemons: one line per event on stdout, rendered once, here.

Every line is ``<logger> [level=<warning|error|critical>] event=<name> key=value …``
(logfmt): values are double-quoted when they need it, every control character is
escaped (a NUL, CR or LF inside a value cannot start a forged line or journald record),
and string values pass through :func:`redact_numbers`. Code logs events, not text::

    log = logs.get_logger(__name__)
    log.info("call_answered", recording_id=rid, customer=masked, worker=3)
    log.warning("upload_retry", recording_id=rid, code="UNAVAILABLE", retry_in_s=1.7)

Integers, floats and booleans are rendered as they are (a status code or a byte count
is never mistaken for a number to redact); ``None`` renders as ``-``. Records from
libraries (or anything logged with a plain message) become ``event=log msg="…"``,
through the same renderer. String values are redacted by
:func:`agent.redaction.redact_numbers` (possible phone numbers, not digit runs);
:class:`NotPersonal` marks the one kind of text that is not (a configured service
number).

Under systemd (``JOURNAL_STREAM`` set) records go to journald's native socket as
structured entries (:mod:`agent.journal`: ``journalctl RECORDING_ID=…``); without the
socket the line goes to stdout with the ``<N>`` priority prefix journald understands
(sd-daemon(3)) and no time stamp. Configured only by the entry point (``agent.cli.main``).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from agent.redaction import redact_numbers

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
FIELDS_ATTR = "callrec_fields"  # LogRecord attribute holding an event's fields
EVENT_ATTR = "callrec_event"  # … and its name
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,63}")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")


class NotPersonal(str):
    """Text known to hold no one's personal number (a configured service number of the
    contact centre): rendered without redaction, still quoted and escaped."""

    __slots__ = ()


# ---------------------------------------------------------------- rendering

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_CONTROL = re.compile(r'[\\"\x00-\x1f\x7f-\x9f\u2028\u2029]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def render_value(value: object) -> str:
    """One logfmt value: numbers as they are, text redacted, quoted and escaped."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _render_float(value)
    text = value if isinstance(value, NotPersonal) else redact_numbers(str(value))
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _CONTROL.sub(_escape_char, text) + '"'


def _render_float(value: float) -> str:
    """Fixed point with up to six decimals (``3.0``, ``0.25``, ``1234567.5``); tiny
    values in exponent form."""
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.6f}".rstrip("0")
    if text.endswith("."):
        text += "0"
    if value != 0 and float(text) == 0:
        return f"{value:.3e}"
    return text


def render_fields(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={render_value(value)}" for key, value in fields.items())


_PAIR = re.compile(r'\s*([a-z][a-z0-9_]{0,63})=("(?:[^"\\]|\\.)*"|[^\s"]*)(?=\s|\Z)')
_UNESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)")
_SMALL_INT = re.compile(r"0|[1-9][0-9]{0,5}")  # a status code or a count, never a number
_UNESCAPED = {"n": "\n", "r": "\r", "t": "\t"}


def is_event_name(name: str) -> bool:
    return _EVENT.fullmatch(name) is not None


def parse_logfmt(text: str) -> dict[str, object] | None:
    """The fields of a logfmt line (``key=value key="quoted value"``), up to six digits
    as ints (a status code, a count; longer runs stay text and are redacted); None
    when the text is not wholly such pairs (a foreign line, e.g. Kamailio's own, is
    then logged as a message)."""
    fields: dict[str, object] = {}
    pos, text = 0, text.rstrip()
    while pos < len(text):
        match = _PAIR.match(text, pos)
        if match is None:
            return None
        key, raw = match.groups()
        value = _unquote(raw) if raw.startswith('"') else raw
        fields[key] = int(raw) if _SMALL_INT.fullmatch(raw) else value
        pos = match.end()
    return fields


def _unquote(raw: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if len(code) > 1:
            return chr(int(code[1:], 16))
        return _UNESCAPED.get(code, code)

    return _UNESCAPE.sub(one, raw[1:-1])


def syslog_priority(levelno: int) -> int:
    return _PRIORITY.get(levelno, 6)


def render_event(event: str, fields: Mapping[str, object]) -> str:
    """``event=<name> key=value …``: the message of every record (see :class:`EventLog`)."""
    return f"event={event} {render_fields(fields)}" if fields else f"event={event}"


def error_text(exc: BaseException) -> str:
    """An exception as a log value: type and message (never a traceback). A database
    error gives its first line only: SQLAlchemy appends the statement (its parameters
    are hidden, ``hide_parameters``) and PostgreSQL a ``DETAIL`` with the failing row's
    values."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException) and hasattr(exc, "statement"):
        return f"{type(exc).__name__}: {type(orig).__name__}: {_first_line(orig)}"
    if hasattr(exc, "diag") and hasattr(exc, "sqlstate"):  # psycopg's own
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def event_of(record: logging.LogRecord) -> tuple[str, dict[str, object]]:
    """A record's event and fields; a foreign record (a library's, or a plain message)
    is ``log`` with its text as ``msg``."""
    fields = getattr(record, FIELDS_ATTR, None)
    event = getattr(record, EVENT_ATTR, None)
    if isinstance(fields, dict) and isinstance(event, str):
        return event, fields
    fields = {"msg": record.getMessage()}
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = error_text(record.exc_info[1])
    return "log", fields


def render_line(record: logging.LogRecord) -> str:
    """``<logger> [level=…] event=<name> key=value …`` without time stamp or prefix."""
    head = [record.name]
    if record.levelno >= logging.WARNING:
        head.append(f"level={record.levelname.lower()}")
    if getattr(record, EVENT_ATTR, None) is not None:
        head.append(record.getMessage())  # rendered once, by EventLog.log
    else:
        head.append(render_event(*event_of(record)))
    return " ".join(head)


class _Formatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = render_line(record)
        if self.journald:
            return f"<{syslog_priority(record.levelno)}>{line}"
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        return f"{stamp.removesuffix('+00:00')}Z {line}"


# ---------------------------------------------------------------- the API


class EventLog:
    """A logger that takes an event name and keyword fields (see the module doc)."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    @property
    def name(self) -> str:
        return self.logger.name

    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)

    def log(self, level: int, event: str, /, **fields: object) -> None:
        self._emit(level, event, fields, with_error=False)

    def _emit(self, level: int, event: str, fields: dict[str, object], with_error: bool) -> None:
        """Log ``event`` with ``fields``; the record's message is the rendered
        ``event=… key=value …`` (what every handler, pytest's too, shows)."""
        if not _EVENT.fullmatch(event):  # checked at every level: a bad name fails in tests
            raise ValueError(f"log event name {event!r}: expected lower_snake_case")
        bad = next((key for key in fields if not _KEY.fullmatch(key)), None)
        if bad is not None:
            raise ValueError(f"log field name {bad!r} of event {event}: expected lower_snake_case")
        if not self.logger.isEnabledFor(level):
            return
        exc = sys.exc_info()[1] if with_error else None
        if exc is not None:
            fields.setdefault("error", error_text(exc))
        extra = {FIELDS_ATTR: fields, EVENT_ATTR: event}
        self.logger.log(level, "%s", render_event(event, fields), extra=extra, stacklevel=3)

    def debug(self, event: str, /, **fields: object) -> None:
        self._emit(logging.DEBUG, event, fields, with_error=False)

    def info(self, event: str, /, **fields: object) -> None:
        self._emit(logging.INFO, event, fields, with_error=False)

    def warning(self, event: str, /, **fields: object) -> None:
        self._emit(logging.WARNING, event, fields, with_error=False)

    def error(self, event: str, /, **fields: object) -> None:
        self._emit(logging.ERROR, event, fields, with_error=False)

    def critical(self, event: str, /, **fields: object) -> None:
        self._emit(logging.CRITICAL, event, fields, with_error=False)

    def exception(self, event: str, /, **fields: object) -> None:
        """An error with the exception's type and message (never a traceback: frames'
        values may hold a customer's number)."""
        self._emit(logging.ERROR, event, fields, with_error=True)


def get_logger(name: str) -> EventLog:
    return EventLog(logging.getLogger(name))


# ---------------------------------------------------------------- configuration


def configure(
    level: str,
    stream: TextIO | None = None,
    *,
    identifier: str = "callrec",
    journal_socket: Path = JOURNAL_SOCKET,
) -> None:
    """Route all logging through one renderer. Under systemd (``JOURNAL_STREAM`` set)
    with journald's socket present, records go to it as structured entries
    (:mod:`agent.journal`, ``SYSLOG_IDENTIFIER=identifier``); otherwise lines go to
    ``stream`` (stdout), with ``<N>`` priority prefixes instead of time stamps under
    systemd."""
    from agent.journal import JournalHandler

    under_systemd = bool(os.environ.get("JOURNAL_STREAM"))
    handler: logging.Handler
    if under_systemd and journal_socket.is_socket():
        handler = JournalHandler(identifier, journal_socket, stream)
    else:
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(_Formatter(journald=under_systemd))
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, JournalHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' own chatter (Alembic's migration steps, watchdog's emitters) only
    # when something is wrong; our own events say what happened.
    for noisy in ("alembic", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("watchdog.observers.inotify").addFilter(_drop_inotify_stop_race)


def _drop_inotify_stop_race(record: logging.LogRecord) -> bool:
    """watchdog 7 logs an error when an inotify event races the observer's stop at
    shutdown; nothing is lost (the rescan at the next start sees every entry)."""
    return "called when the thread is inactive" not in record.getMessage()


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
