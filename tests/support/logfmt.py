"""What a log reader expects of every line: ``<time> <logger> event=<name> key=value …``
in logfmt (Loki's ``| logfmt``): bare values or double-quoted ones with backslash
escapes, nothing else."""

from __future__ import annotations

import re

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
_HEAD = re.compile(rf"(?:{STAMP} |<[0-7]>)?(?P<logger>[A-Za-z_][\w.]*) (?P<fields>.*)")
_PAIR = re.compile(r'([a-z][a-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |\Z)')
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def problems(line: str) -> str | None:
    """Why ``line`` is not one logfmt record with one quoting style, or None."""
    if _CONTROL.search(line):
        return "a raw control character"
    head = _HEAD.fullmatch(line)
    if head is None:
        return "no logger name"
    fields, pos, keys = head["fields"], 0, []
    while pos < len(fields):
        pair = _PAIR.match(fields, pos)
        if pair is None:
            return f"not key=value at {fields[pos : pos + 30]!r}"
        if pair[2].startswith("'"):
            return f"single-quoted value of {pair[1]}"
        keys.append(pair[1])
        pos = pair.end()
    level = 1 if keys[:1] == ["level"] else 0
    if keys[level : level + 1] != ["event"]:
        return "no event= first"
    return None
