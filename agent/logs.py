"""Logging for the daemons: one line per event on stdout, ``key=value`` pairs, with the
``<N>`` priority prefix journald understands (sd-daemon(3)) when run under systemd.

Configured only by the entry point (``agent.cli``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

# Anything that could be a phone number: 6+ digits, optionally with + and separators.
_NUMBER_LIKE = re.compile(r"(?<![\w.])\+?(?:\d[\s\-\.]?){5,}\d(?![\w])")


def redact_numbers(text: str) -> str:
    """Blank every digit run long enough to be a phone number (keeps short ids)."""
    return _NUMBER_LIKE.sub("<redacted>", text)


class _Formatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            exc = record.exc_info[1]
            message += f" error={type(exc).__name__}:{str(exc)!r}"
        if record.levelno >= logging.WARNING and "level=" not in message:
            message = f"level={record.levelname.lower()} {message}"
        line = f"{record.name} {message}".replace("\n", "\\n")
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        stamp = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        return f"{stamp.removesuffix('+00:00')}Z {line}"


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
