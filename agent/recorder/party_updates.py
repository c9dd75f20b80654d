"""Mid-call metadata updates, pure functions: the parties a re-INVITE's or UPDATE's
SIPREC metadata names (a transfer: a new employee joins), classified as
``agent.recorder.parties`` classifies an INVITE's (:func:`read_update`), and merged into
the capture's metadata (:func:`apply_update`), which only ever adds what the call did
not know yet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from agent.capture import UNKNOWN, CaptureMeta, Employee, Flag
from agent.directory import Directory
from agent.recorder.parties import CallParties, EmployeeTag, PartyRules, classify
from agent.recorder.siprec import MetadataError, SipParseError, parse_invite, parse_metadata


def read_update(
    raw: str | bytes, directory: Directory, rules: PartyRules, kept: str | None = None
) -> tuple[CallParties | None, str | None]:
    """The parties named by the metadata of an in-dialog re-INVITE or UPDATE, and why
    it could not be used. ``(None, None)``: the request carries no metadata (a session
    refresh, hold or resume), which is nothing to report."""
    try:
        request = parse_invite(raw)
    except SipParseError as exc:
        return None, str(exc)
    if kept is not None:
        request = replace(request, metadata=kept)
    if request.metadata is None:
        return None, None
    try:
        metadata = parse_metadata(request.metadata)
    except MetadataError as exc:
        return None, str(exc)
    return classify(metadata, (), directory, rules), None


_PARTY_FLAGS = (
    Flag.METADATA_INVALID,
    Flag.METADATA_MISSING,
    Flag.CUSTOMER_UNKNOWN,
    Flag.CUSTOMER_WITHHELD,
    Flag.SERVICE_UNKNOWN,
)


def apply_update(meta: CaptureMeta, update: CallParties, at: str) -> CaptureMeta:
    """Merge a metadata update into a capture's metadata. Employees who were not on the
    call join it at ``at``; what the call did not know (customer, service number,
    direction — e.g. the INVITE had no metadata) is filled in. Nothing known is ever
    replaced (an update may be a partial document naming only who joined)."""
    employees = _joined(meta.employees, update.employees, at)
    flags: list[Flag] = [f for f in meta.flags if f is not Flag.EMPLOYEE_UNKNOWN]
    if all(e.id == UNKNOWN for e in employees):
        flags.append(Flag.EMPLOYEE_UNKNOWN)
    customer, service, direction = meta.customer, meta.service_number, meta.direction
    if customer.kind.value == UNKNOWN and update.customer.kind.value != UNKNOWN:
        customer, direction = update.customer, update.direction
        flags = [f for f in flags if f not in _PARTY_FLAGS]
        flags += [f for f in update.flags if f is Flag.CUSTOMER_WITHHELD]
        if service is None and update.service_number is None:
            flags.append(Flag.SERVICE_UNKNOWN)
    if service is None and update.service_number is not None:
        service = update.service_number
        flags = [f for f in flags if f is not Flag.SERVICE_UNKNOWN]
    return replace(
        meta,
        customer=customer,
        service_number=service,
        direction=direction,
        employees=employees,
        flags=tuple(dict.fromkeys(flags)),
    )


def _joined(
    current: tuple[Employee, ...], update: Sequence[EmployeeTag], at: str
) -> tuple[Employee, ...]:
    """``current`` plus whoever in ``update`` is new; the placeholder for "nobody
    known" (an unknown employee without an AoR) gives way to anyone real."""
    employees = list(current)
    for tag in update:
        if tag.id == UNKNOWN and (not tag.aor or any(e.aor == tag.aor for e in employees)):
            continue
        if tag.id != UNKNOWN and any(e.id == tag.id for e in employees):
            continue
        employees.append(Employee(tag.id, tag.name, tag.aor, at, tag.team))
    real = [e for e in employees if e.id != UNKNOWN or e.aor]
    return tuple(real or employees)
