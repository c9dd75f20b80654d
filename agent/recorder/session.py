"""What a recorder worker writes for one call, free of pjsua2 (``sip.py`` owns every
pjsua2 object and calls these): the capture's metadata at answer, mid-call updates
(a transfer adds an employee), and the capture's move to ``ready`` at the end.

The capture directory layout is described in :mod:`agent.capture`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from dataclasses import replace
from pathlib import Path

from agent import logs, metrics
from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    MIXED_LEG,
    UNKNOWN,
    CaptureMeta,
    Employee,
    Flag,
    cut_wav,
    fsync_dir,
    iso_ms,
    leg_seconds,
    parse_iso,
    repair_wav_header,
    write_meta,
)
from agent.directory import Directory
from agent.recorder.parties import CallPlan, PartyRules
from agent.recorder.party_updates import apply_update, read_update

log = logs.get_logger("agent.recorder.sip")

SHORT_LEG_S = 2.0  # a leg this much shorter than its call lost audio (see short_legs)

LEG_ORDER = (CUSTOMER_LEG, EMPLOYEE_LEG, MIXED_LEG)


def call_ref(call_id: str) -> str:
    """A stable, non-reversible reference to a SIP Call-ID for tracing (the front logs
    the same: ``$(ci{s.sha256}{s.substr,0,16})``)."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:16]


def open_files() -> set[str]:
    """Paths this process has open (Linux ``/proc/self/fd``)."""
    paths: set[str] = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            paths.add(os.readlink(fd))
    return paths


def new_meta(
    site: str, recording_id: str, ref: str, plan: CallPlan, started: dt.datetime
) -> CaptureMeta:
    """The capture's metadata as written at answer (``ended_at`` still open)."""
    parties = plan.parties
    joined = iso_ms(started)
    return CaptureMeta(
        recording_id=recording_id,
        site=site,
        source=plan.source,
        call_ref=ref,
        direction=parties.direction,
        started_at=joined,
        ended_at=None,
        service_number=parties.service_number,
        customer=parties.customer,
        employees=tuple(Employee(e.id, e.name, e.aor, joined, e.team) for e in parties.employees),
        legs=tuple(leg for leg in LEG_ORDER if leg in plan.legs.values()),
        flags=parties.flags,
    )


def log_answered(meta: CaptureMeta, plan: CallPlan, worker: int) -> None:
    metrics.CALLS_ANSWERED.labels(meta.source).inc()
    metrics.CALLS_ACTIVE.inc()
    log.info(
        "call_answered",
        call_ref=meta.call_ref,
        recording_id=meta.recording_id,
        worker=worker,
        source=meta.source,
        direction=meta.direction.value,
        customer=meta.customer.masked,
        employee=", ".join(e.name for e in meta.employees),
        service=logs.NotPersonal(meta.service_number or "unknown"),  # one of ours
        legs=",".join(meta.legs),
        flags=",".join(meta.flags) or "-",
    )
    if plan.problem is not None:
        missing = Flag.METADATA_MISSING in meta.flags
        event = "metadata_missing" if missing else "metadata_invalid"
        log.warning(event, recording_id=meta.recording_id, reason=plan.problem)
    log_unknown_employees(meta, meta.employees)


def log_unknown_employees(meta: CaptureMeta, employees: tuple[Employee, ...]) -> None:
    for employee in employees:
        if employee.id == UNKNOWN:
            log.warning("employee_unknown", recording_id=meta.recording_id, aor=employee.aor or "-")


def log_updated(before: CaptureMeta, after: CaptureMeta) -> None:
    added = after.employees[len(before.employees) :]
    kept = {(e.id, e.aor) for e in after.employees}
    dropped = [e for e in before.employees if (e.id, e.aor) not in kept]
    log.info(
        "call_updated",
        recording_id=after.recording_id,
        employees_added=len(added) - len(dropped),
        employees=", ".join(e.name for e in after.employees),
        customer=after.customer.masked,
        direction=after.direction.value,
        flags=",".join(after.flags) or "-",
    )
    log_unknown_employees(after, added)


def merge_updates(
    meta: CaptureMeta,
    directory: Path,
    updates: list[tuple[dt.datetime, str, str | None]],
    people: Directory,
    rules: PartyRules,
) -> CaptureMeta:
    """Apply the metadata of in-dialog re-INVITEs/UPDATEs (time received, raw text, the
    metadata the front kept aside for it) to the capture: ``capture.json`` is
    rewritten when something changed."""
    for at, raw, kept in updates:
        parties, problem = read_update(raw, people, rules, kept)
        if problem is not None:
            log.warning("metadata_update_invalid", recording_id=meta.recording_id, reason=problem)
        if parties is None:
            continue
        merged = apply_update(meta, parties, iso_ms(at))
        if merged != meta:
            _write_update(directory, merged)
            log_updated(meta, merged)
            meta = merged
    return meta


def _write_update(directory: Path, meta: CaptureMeta) -> None:
    """A mid-call update is kept in memory if the disk refuses it: the capture's
    metadata is written again (with it) when the call ends."""
    try:
        write_meta(directory, meta)
    except OSError as exc:
        log.warning("capture_update_deferred", recording_id=meta.recording_id, error=exc.strerror)


def short_legs(directory: Path, legs: tuple[str, ...], call_s: float) -> dict[str, float]:
    """Legs holding less audio than the call lasted (by SHORT_LEG_S or more): their
    writes failed (a full disk) or stopped. Leg → seconds on disk."""
    found: dict[str, float] = {}
    for leg in legs:
        seconds = leg_seconds(directory / leg)
        if seconds is None or seconds < call_s - SHORT_LEG_S:
            found[leg] = seconds or 0.0
    return found


def finish_capture(
    meta: CaptureMeta,
    directory: Path,
    ready_dir: Path,
    ended: dt.datetime,
    flags: list[Flag],
    received: dict[str, tuple[int, int]] | None = None,
    audio_until_s: float | None = None,
) -> CaptureMeta:
    """Close the capture's metadata (end time, legs present, flags) and move it to
    ``ready`` with one rename; a leg that was never written, or holds less audio than
    the call lasted, makes it incomplete. ``received``: RTP packets received and lost
    per party, for the log line. ``audio_until_s``: every leg is cut to that many
    seconds from its first sample (the call ended before the worker read the BYE: the
    legs share their start, so they stay aligned). An OSError (a full disk) leaves the
    capture where it is, unchanged in memory, for the caller to try again."""
    legs = tuple(leg for leg in meta.legs if (directory / leg).exists())
    flags = [*flags] + ([Flag.INCOMPLETE] if legs != meta.legs else [])
    for leg in legs:  # pjsua leaves 0 in the sizes when its last write failed (full disk)
        with contextlib.suppress(ValueError):
            repair_wav_header(directory / leg)
            if audio_until_s is not None:
                cut_wav(directory / leg, audio_until_s)
    duration_s = (ended - parse_iso(meta.started_at)).total_seconds()
    short = short_legs(directory, legs, duration_s)
    if short:
        flags.append(Flag.INCOMPLETE)
    meta = replace(meta, ended_at=iso_ms(ended), legs=legs).with_flags(*flags)
    meta = meta.with_pauses_closed(iso_ms(ended))
    write_meta(directory, meta)
    directory.rename(ready_dir / meta.recording_id)
    with contextlib.suppress(OSError):
        fsync_dir(ready_dir)
        fsync_dir(directory.parent)
    metrics.CALLS_ACTIVE.dec()
    ended_by = next((f for f in (Flag.RTP_TIMEOUT, Flag.INCOMPLETE) if f in meta.flags), None)
    metrics.CALLS_ENDED.labels(ended_by.value if ended_by else "bye").inc()
    for leg, seconds in short.items():
        log.warning(
            "leg_short", recording_id=meta.recording_id, leg=leg, audio_s=round(seconds, 3),
            call_s=round(duration_s, 3),
        )  # fmt: skip
    rtp = ",".join(f"{party}:{got}/{lost}" for party, (got, lost) in (received or {}).items())
    log.info(
        "call_recorded",
        recording_id=meta.recording_id,
        call_ref=meta.call_ref,
        duration_s=round(duration_s, 3),
        legs=",".join(legs) or "-",
        flags=",".join(meta.flags) or "-",
        rtp_received_lost=rtp or "-",
    )
    return meta
