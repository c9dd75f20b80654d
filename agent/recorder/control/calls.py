"""What a control command does to a live call's metadata, free of pjsua2: pauses
(opened and closed, who asked), the discard tombstone, a late employee binding, and
the status document the control API answers with.

The worker's engine (:mod:`agent.recorder.sip.engine`) applies these and does the
audio side (the stream disconnected from its recorder: the bridge's idle tone then
writes silence, so the timeline stays whole).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from agent.capture import (
    PAUSE_WHO_MAX,
    UNKNOWN,
    CaptureMeta,
    Employee,
    Flag,
    Pause,
    parse_iso,
)

SRC = "src"  # a SIPREC a=inactive from the recording client
_WHO = re.compile(r"[a-z]{2,8}(:[A-Za-z0-9._@-]{1,48})?")
OPS = ("pause", "resume", "discard", "status", "employee")


def valid_who(who: str) -> bool:
    """``api:<integration>``, ``src``, ``pbx``…: short, printable, no free text."""
    return len(who) <= PAUSE_WHO_MAX and bool(_WHO.fullmatch(who))


def open_pause(meta: CaptureMeta, who: str, at: str) -> CaptureMeta:
    """A pause from ``at`` on; unchanged if one is open already (idempotent). A pause
    asked for before the last resume took effect (a resume waits out the jitter
    buffer, so its end lies a little ahead) goes on instead: the streams were never
    connected again, and intervals must not overlap (the store refuses them)."""
    if meta.paused:
        return meta
    if meta.pauses and parse_iso(str(meta.pauses[-1].end)) > parse_iso(at):
        reopened = replace(meta.pauses[-1], end=None)
        return replace(meta, pauses=(*meta.pauses[:-1], reopened)).with_flags(Flag.PAUSED)
    pauses = (*meta.pauses, Pause(start=at, end=None, who=who))
    return replace(meta, pauses=pauses).with_flags(Flag.PAUSED)


def close_pause(meta: CaptureMeta, at: str, only_who: str | None = None) -> CaptureMeta:
    """End the open pause at ``at`` (only one ``only_who`` asked for, if given)."""
    if not meta.paused or (only_who is not None and meta.pauses[-1].who != only_who):
        return meta
    last = replace(meta.pauses[-1], end=at)
    return replace(meta, pauses=(*meta.pauses[:-1], last))


def discarded(meta: CaptureMeta, at: str) -> CaptureMeta:
    """The tombstone of a call stopped and discarded: no legs, pauses closed."""
    return replace(meta, legs=()).with_pauses_closed(at).with_flags(Flag.DISCARDED)


def bind_employee(meta: CaptureMeta, employee: Employee) -> CaptureMeta:
    """The employee the ACD/PBX names later: replaces the "nobody known" placeholder,
    joins the call otherwise (at the time given); a repeat changes nothing."""
    if any(e.id == employee.id for e in meta.employees):
        return meta
    kept = tuple(e for e in meta.employees if e.id != UNKNOWN)
    if kept == meta.employees:
        employees = (*kept, employee)
    else:  # the placeholder held the call from the start: the employee did too
        employees = (*kept, replace(employee, joined_at=meta.started_at))
    flags = tuple(f for f in meta.flags if f is not Flag.EMPLOYEE_UNKNOWN)
    return replace(meta, employees=employees, flags=flags)


def call_status(meta: CaptureMeta, state: str) -> dict[str, Any]:
    """The control API's view of a call (masked customer only)."""
    return {
        "recording_id": meta.recording_id,
        "call_ref": meta.call_ref,
        "state": state,  # "recording", "paused", "discarded", "ended"
        "paused": meta.paused,
        "started_at": meta.started_at,
        "ended_at": meta.ended_at,
        "customer": meta.customer.masked,
        "employees": [{"id": e.id, "name": e.name, "aor": e.aor} for e in meta.employees],
        "pauses": [{"start": p.start, "end": p.end, "who": p.who} for p in meta.pauses],
        "flags": [f.value for f in meta.flags],
    }


def live_state(meta: CaptureMeta) -> str:
    if Flag.DISCARDED in meta.flags:
        return "discarded"
    return "paused" if meta.paused else "recording"
