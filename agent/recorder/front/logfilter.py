"""Kamailio's log lines, made safe to keep: Kamailio 5.6 prints whole SIP headers and
messages on parse errors (an unbalanced quote in a caller-ID name is enough; a bad
TCP request dumps its whole buffer, one line per line of the message). Nothing in
its configuration stops that without also silencing the front's own event lines, so
every line goes through :func:`kamailio_record`:

- a line without Kamailio's prefix (`` 3(1234) ERROR: ...``) continues a dump of a
  message: it is dropped, whatever it holds;
- a prefixed line keeps its level; SIP/tel URI user parts, digit runs of 6 or more
  (ports and short ids survive) and anything number-like are blanked, IPv4 addresses
  kept (a refused client's address is what an operator needs).

``callrec front-log -- /usr/sbin/kamailio …`` (callrec-front.service) runs Kamailio
with its stdout and stderr through this filter into ours (journald); with
``[sip] run_front = true`` the agent relays them the same way
(:class:`agent.recorder.front.kamailio.FrontProcess`).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import subprocess
import sys
from types import FrameType

from agent import logs
from agent.redaction import redact_numbers

log = logs.get_logger("agent.recorder.front.kamailio")

_LINE = re.compile(r"^\s*\d+\((\d+)\)\s+([A-Z]+):\s+(.*)$")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "NOTICE": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "ALERT": logging.ERROR,
    "BUG": logging.CRITICAL,
}
# xhttp wants tcp_accept_no_cl for clients that send no Content-Length; ours does.
_BENIGN = ("tcp_accept_no_cl not set",)
_URI_USER = re.compile(r"\b(sips?:)[^@\s;>\"']+@", re.IGNORECASE)
_TEL_URI = re.compile(r"\btel:[^\s;>\"']+", re.IGNORECASE)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w.])")
# Six digits or more, with or without separators (040.123.4567, +358 40 123): in a
# Kamailio line that is never anything an operator needs (IPv4 addresses are kept).
_DIGITS = re.compile(r"\+?(?:\d[\s\-./]?){5,}\d")
_KEPT = re.compile(r"\x00(\d+)\x00")


def sanitize(text: str, strict: bool = True) -> str:
    """A Kamailio log line without URI user parts or number-like digit runs; IPv4
    addresses (a refused client's, a worker's) are kept: they are not numbers.
    ``strict``: every run of six digits goes too (Kamailio's own lines); our config's
    event lines (``strict=False``) keep their call_ref digests whole."""
    text = _URI_USER.sub(r"\1<redacted>@", text.replace("\x00", ""))
    text = _TEL_URI.sub("tel:<redacted>", text)
    kept: list[str] = []

    def keep(match: re.Match[str]) -> str:
        kept.append(match.group())
        return f"\x00{len(kept) - 1}\x00"

    text = redact_numbers(_IPV4.sub(keep, text))
    if strict:
        text = _DIGITS.sub("<redacted>", text)
    return _KEPT.sub(lambda m: kept[int(m.group(1))], text)


def kamailio_record(raw: str) -> tuple[int, str, dict[str, object] | None] | None:
    """One line of Kamailio's output as (level, sanitised text, the fields of our own
    config's xlog line or None); None: drop it (the continuation of a dumped message,
    or an empty line)."""
    match = _LINE.match(raw)
    if match is None:
        return None
    level = _LEVELS.get(match.group(2), logging.INFO)
    text = sanitize(match.group(3), strict=not match.group(3).startswith("<script>: "))
    if any(benign in text for benign in _BENIGN):
        level = logging.DEBUG
    elif level == logging.INFO and not text.startswith("<script>:"):
        level = logging.DEBUG  # Kamailio's own start-up chatter
    script = text.startswith("<script>: ")  # an xlog line of our config: logfmt
    fields = logs.parse_logfmt(text.removeprefix("<script>: ")) if script else None
    event = fields.get("event") if fields else None
    if not isinstance(event, str) or not logs.is_event_name(event):
        fields = None
    return level, text, fields


def emit(logger: logs.EventLog, level: int, text: str, fields: dict[str, object] | None) -> None:
    """Log a Kamailio line: our config's event with its fields, else as a message."""
    if fields is None:
        logger.log(level, "kamailio", msg=text)
        return
    fields = dict(fields)
    event = str(fields.pop("event"))
    logger.log(level, event, **fields)


# ---------------------------------------------------------------- callrec front-log


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    front_log = sub.add_parser(
        "front-log", help="run Kamailio (the SIP front) with its log lines redacted"
    )
    front_log.add_argument("kamailio", nargs=argparse.REMAINDER, help="-- kamailio ARGS…")


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "front-log":
        return None
    command: list[str] = list(args.kamailio)
    return run(command[1:] if command[:1] == ["--"] else command)


def run(command: list[str]) -> int:
    """Run ``command`` (Kamailio in the foreground) with its output through
    :func:`kamailio_record`; signals are passed on; its exit code is ours."""
    if not command:
        sys.stderr.write("callrec front-log: expected -- kamailio ARGS…\n")
        return 2
    logs.configure("info")
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )

    def forward(signum: int, frame: FrameType | None) -> None:
        proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    dropped = 0
    assert proc.stdout is not None
    for raw in proc.stdout:
        record = kamailio_record(raw.rstrip("\n"))
        if record is None:
            dropped += 1 if raw.strip() else 0
            continue
        emit(log, *record)
    code = proc.wait()
    log.info("front_exited", exit_code=code, lines_dropped=dropped)
    return code if code >= 0 else 128 - code
