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
through the same renderer.

Under systemd (``JOURNAL_STREAM`` set) the line carries the ``<N>`` priority prefix
journald understands (sd-daemon(3)) and no time stamp. Configured only by the entry
point (``agent.cli``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
FIELDS_ATTR = "callrec_fields"  # LogRecord attribute holding an event's fields
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,63}")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")

# Anything that could be a phone number: 6+ digits, optionally with + and separators.
_NUMBER_LIKE = re.compile(r"(?<![\w.])\+?(?:\d[\s\-\.]?){5,}\d(?![\w*])")


def redact_numbers(text: str) -> str:
    """Blank every digit run long enough to be a phone number (keeps short ids)."""
    return _NUMBER_LIKE.sub("<redacted>", text)


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
        return f"{value:.6g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.3e}"
    text = redact_numbers(value if isinstance(value, str) else str(value))
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _CONTROL.sub(_escape_char, text) + '"'


def render_fields(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={render_value(value)}" for key, value in fields.items())


def _event_and_fields(record: logging.LogRecord) -> tuple[str, dict[str, object]]:
    fields = getattr(record, FIELDS_ATTR, None)
    if isinstance(fields, dict) and isinstance(record.msg, str):
        return record.msg, dict(fields)
    return "log", {"msg": record.getMessage()}


def _legacy_line(record: logging.LogRecord) -> str | None:
    """TRANSITION: a message still written as ``"event=… key=%s"`` text is kept as it
    is (its call site redacted what needed it), with control characters escaped.
    Removed once every call site logs through :class:`EventLog`."""
    if getattr(record, FIELDS_ATTR, None) is not None:
        return None
    message = record.getMessage()
    if not message.startswith("event="):
        return None
    return _CONTROL_ONLY.sub(_escape_char, message)


_CONTROL_ONLY = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _Formatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _event_and_fields(record)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields.setdefault("error", f"{type(exc).__name__}: {exc}")
        head = [record.name]
        legacy = _legacy_line(record)
        if record.levelno >= logging.WARNING and "level=" not in (legacy or ""):
            head.append(f"level={record.levelname.lower()}")
        if legacy is not None:
            head.append(legacy)
            fields.pop("msg", None)
        else:
            head.append(f"event={event}")
        line = " ".join(head)
        if fields:
            line += " " + render_fields(fields)
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
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

    def log(self, level: int, event: str, /, exc_info: Any = None, **fields: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        if not _EVENT.fullmatch(event):
            raise ValueError(f"log event name {event!r}: expected lower_snake_case")
        bad = next((key for key in fields if not _KEY.fullmatch(key)), None)
        if bad is not None:
            raise ValueError(f"log field name {bad!r} of event {event}: expected lower_snake_case")
        self.logger.log(level, event, exc_info=exc_info, extra={FIELDS_ATTR: fields}, stacklevel=2)

    def debug(self, event: str, /, **fields: object) -> None:
        self.log(logging.DEBUG, event, **fields)

    def info(self, event: str, /, **fields: object) -> None:
        self.log(logging.INFO, event, **fields)

    def warning(self, event: str, /, **fields: object) -> None:
        self.log(logging.WARNING, event, **fields)

    def error(self, event: str, /, **fields: object) -> None:
        self.log(logging.ERROR, event, **fields)

    def critical(self, event: str, /, **fields: object) -> None:
        self.log(logging.CRITICAL, event, **fields)

    def exception(self, event: str, /, **fields: object) -> None:
        """An error with the exception's type and message (never a traceback: frames'
        values may hold a customer's number)."""
        self.log(logging.ERROR, event, exc_info=True, **fields)


def get_logger(name: str) -> EventLog:
    return EventLog(logging.getLogger(name))


# ---------------------------------------------------------------- configuration


def configure(level: str, stream: object = None) -> None:
    """Route all logging to one stream; under systemd (JOURNAL_STREAM set) add priority
    prefixes and leave time stamps to journald."""
    handler = logging.StreamHandler(stream or sys.stdout)  # type: ignore[arg-type]
    handler.setFormatter(_Formatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
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
