"""Catalog queries and changes behind the Access service: scoped search, the
data-subject changes (each written with its audit event in one transaction) and the
export package's metadata (finding calls by number is ``agent.store.keys.numbers``),
and the view of a row the service answers with.
Blocking; the service runs them in threads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from agent.directory import Person
from agent.manifest import AUDIO_FORMATS
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.store.access.rules import RecordingFacts, Scope
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, RecordingRow, from_ms, recordings
from agent.store.console import info_of
from agent.store.retention.schedule import add_months

SCAN_BATCH = 500
MAX_SCAN = 50_000


@dataclass(frozen=True)
class Filters:
    since_ms: int | None = None
    until_ms: int | None = None
    employee_id: str = ""
    team: str = ""
    service_number: str = ""
    customer_masked: str = ""
    flags: tuple[str, ...] = ()
    direction: str = ""

    def names(self) -> str:
        """Which filters were given (for the audit log; not their values)."""
        given = [k for k, v in vars(self).items() if v not in (None, "", ())]
        return ",".join(given) or "none"


def _mentions(value: str) -> sa.ColumnElement[bool]:
    """A superset test: ``value`` appears as a JSON string in ``employees_json``."""
    return recordings.c.employees_json.contains(json.dumps(value), autoescape=True)


def _filtered(filters: Filters, scope: Scope) -> sa.Select[Any]:
    c = recordings.c
    query = sa.select(recordings).where(c.destroy_reason.is_(None))
    if filters.since_ms is not None:
        query = query.where(c.started_at_ms >= filters.since_ms)
    if filters.until_ms is not None:
        query = query.where(c.started_at_ms < filters.until_ms)
    if filters.employee_id:
        query = query.where(
            sa.or_(c.employee_id == filters.employee_id, _mentions(filters.employee_id))
        )
    if filters.team:
        query = query.where(c.employee_team == filters.team)
    if filters.service_number:
        query = query.where(c.service_number == filters.service_number)
    if filters.customer_masked:
        query = query.where(c.customer_masked == filters.customer_masked)
    if filters.direction:
        query = query.where(c.direction == filters.direction)
    for flag in filters.flags:
        query = query.where(c.flags.contains(flag, autoescape=True))
    if not scope.everything:
        ids, teams = sorted(scope.employee_ids), sorted(scope.teams)
        query = query.where(
            sa.or_(
                c.employee_id.in_(ids),
                c.employee_team.in_(teams),
                *(_mentions(v) for v in ids + teams),
            )
        )
    return query


def _exact(row: RecordingRow, filters: Filters, scope: Scope) -> bool:
    """The SQL above over-approximates; this is the rule."""
    facts = RecordingFacts.of(row)
    if filters.employee_id and filters.employee_id not in facts.employee_ids:
        return False
    if filters.flags and not set(filters.flags) <= set(row.flags.split(",")):
        return False
    return scope.covers(facts)


def search(
    catalog: Catalog, filters: Filters, scope: Scope, limit: int
) -> tuple[list[RecordingRow], bool]:
    """Up to ``limit`` recordings newest first, and whether more matched."""
    base = _filtered(filters, scope).order_by(
        recordings.c.started_at_ms.desc(), recordings.c.recording_id.desc()
    )
    found: list[RecordingRow] = []
    after: tuple[int, str] | None = None
    scanned = 0
    # The first batch is about what the caller asked for (the SQL rarely
    # over-approximates by much); later ones are full.
    size = min(SCAN_BATCH, limit + 1)
    while scanned < MAX_SCAN:
        query = base.limit(size)
        if after is not None:
            query = query.where(
                sa.tuple_(recordings.c.started_at_ms, recordings.c.recording_id) < after
            )
        with catalog.engine.connect() as conn:
            batch = [RecordingRow(**r._mapping) for r in conn.execute(query)]
        for row in batch:
            if _exact(row, filters, scope):
                if len(found) == limit:
                    return found, True
                found.append(row)
        scanned += len(batch)
        if len(batch) < size:
            return found, False
        after = (batch[-1].started_at_ms, batch[-1].recording_id)
        size = SCAN_BATCH
    return found, True


def set_state(
    catalog: Catalog, recording_id: str, column: str, value: bool, event: audit.Event
) -> bool:
    """Set ``restricted`` or ``legal_hold``; audited in the same transaction. Returns
    whether it changed (False: it already was so)."""
    if column not in ("restricted", "legal_hold"):
        raise ValueError(column)
    c = recordings.c
    with catalog.engine.begin() as conn:
        changed = (
            conn.execute(
                sa.update(recordings)
                .where(c.recording_id == recording_id, c.destroy_reason.is_(None))
                .where(recordings.c[column] != value)
                .values({column: value})
                .returning(c.recording_id)
            ).first()
            is not None
        )
        detail = f"{column}={str(value).lower()} changed={str(changed).lower()}"
        audit.append_event(conn, _with_detail(event, detail))
    return changed


def _with_detail(event: audit.Event, detail: str) -> audit.Event:
    joined = f"{event.detail}; {detail}" if event.detail else detail
    return audit.Event(
        event.actor, event.action, event.recording_id, event.reason, event.outcome,
        event.purpose, joined,
    )  # fmt: skip


class RectifyError(ValueError):
    """The employee to correct is not tagged on the recording."""


def rectify(
    catalog: Catalog, recording_id: str, wrong_id: str, person: Person, event: audit.Event
) -> bool:
    """Re-tag the employee ``wrong_id`` of a recording as ``person`` (name and team from
    the directory); audited in the same transaction."""
    c = recordings.c
    query = sa.select(recordings).where(c.recording_id == recording_id)
    if catalog.dialect == "postgresql":
        query = query.with_for_update()
    with catalog.engine.begin() as conn:
        found = conn.execute(query).first()
        if found is None:
            raise RectifyError(f"recording {recording_id} is gone")
        row = RecordingRow(**found._mapping)
        employees = row.employees
        tagged = [e for e in employees if e.get("id") == wrong_id]
        if not tagged and row.employee_id != wrong_id:
            raise RectifyError(f"employee {wrong_id!r} is not tagged on recording {recording_id}")
        for entry in tagged:
            entry.update(id=person.id, name=person.name, team=person.team)
        values: dict[str, Any] = {"employees_json": json.dumps(employees)}
        if row.employee_id == wrong_id:
            values.update(
                employee_id=person.id, employee_name=person.name, employee_team=person.team
            )
        conn.execute(sa.update(recordings).where(c.recording_id == recording_id).values(values))
        audit.append_event(conn, _with_detail(event, f"from={wrong_id} to={person.id}"))
    return wrong_id != person.id


def _iso(ms: int) -> str:
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audio_name(row: RecordingRow) -> str:
    return f"{row.recording_id}.{AUDIO_FORMATS.get(row.audio_format, 'bin')}"


def package_metadata(rows: Sequence[RecordingRow], generated_ms: int) -> str:
    """The data-subject package's metadata: exactly the register's fields per call."""
    items = [
        {
            "recording_id": row.recording_id,
            "started_at": _iso(row.started_at_ms),
            "ended_at": _iso(row.ended_at_ms),
            "duration_ms": row.duration_ms,
            "direction": row.direction,
            "service_number": row.service_number,
            "customer_number": row.customer_masked,
            "employees": [e.get("name") for e in row.employees] or [row.employee_name],
            "audio_file": audio_name(row),
            "audio_format": row.audio_format,
            "audio_sha256": row.sha256,
            "restricted": row.restricted,
            "legal_hold": row.legal_hold,
            "pauses": row.pauses,  # written as silence: start, end (UTC), who asked
        }
        for row in rows
    ]
    package = {"generated_at": _iso(generated_ms), "recordings": items}
    return json.dumps(package, indent=2, ensure_ascii=False)


def today_utc() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def view_of(row: RecordingRow, retention_months: int | None = None) -> apb.RecordingView:
    view = apb.RecordingView(
        info=info_of(row), restricted=row.restricted, legal_hold=row.legal_hold
    )
    if retention_months is not None:
        view.destroy_after.FromDatetime(add_months(from_ms(row.ended_at_ms), retention_months))
    for employee in row.employees:
        joined = view.joined_at.add()
        if employee.get("joined_at"):
            with contextlib.suppress(ValueError):
                joined.FromDatetime(dt.datetime.fromisoformat(employee["joined_at"]))
    return view
