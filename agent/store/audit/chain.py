"""The audit log: an append-only, hash-chained table of what was done to which
recording, by whom, why (purpose and reason) and with what outcome.

Chain format (version 1). Every entry has a gapless sequence number ``seq`` (1, 2, …)
and stores ``prev_hash`` (the previous entry's ``entry_hash``; 64 zeros for the first)
and ``entry_hash = sha256(canonical)``, where ``canonical`` is the UTF-8 JSON object
(keys sorted, no spaces)::

    {"action", "actor", "at_ms", "detail", "outcome", "prev", "purpose", "reason",
     "recording_id", "seq", "v": 1}

The one-row table ``audit_head`` holds the newest ``seq`` and ``entry_hash``; ``append``
locks it first (an UPDATE that changes nothing), which serialises appenders on both
engines (SQLite: the write lock; PostgreSQL: the row lock), takes the entries' time
under that lock (never before the previous entry's: times only go forward along the
chain, however sweepers and services on several hosts interleave), inserts them and
moves the head in one UPDATE. ``verify`` notices entries removed from the end. A
trigger (migration 0006) refuses any other UPDATE of the head — one that does not
move it to the newest entry of a chain that follows the old head — and its DELETE.
Editing an entry breaks its hash, removing one leaves a gap in ``seq``, reordering
breaks ``prev_hash``. The database also refuses UPDATE/DELETE on ``audit_events``
(triggers made by migration 0003), so tampering needs the owner's rights, and
``callrec audit verify`` still names the first bad entry. The head hash it prints can
be written down elsewhere (a ticket, a notary) to pin the whole history.

``append`` takes the caller's connection, so an event commits or rolls back together
with the change it describes (the sweeper deletes a row and records it in one
transaction, which is why each destruction is audited exactly once). Entries hold no
customer data: ids of recordings and employees, purposes, outcomes, counts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from agent.store.access import tokens as _tokens  # noqa: F401  (access_tokens joins the metadata)
from agent.store.catalog import Catalog, metadata, now_ms
from agent.store.ingest import denylist as _denylist  # noqa: F401  (and agent_denylist)

GENESIS = "0" * 64
CHAIN_VERSION = 1

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column(
        "event_id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("recording_id", sa.String(32), nullable=True),
    sa.Column("reason", sa.String(200), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("purpose", sa.String(16), nullable=False, server_default=""),
    sa.Column("detail", sa.String(400), nullable=False, server_default=""),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("entry_hash", sa.String(64), nullable=False),
    sa.Index("ix_audit_events_recording", "recording_id"),
    sa.Index("ix_audit_events_at", "at_ms"),
    sa.Index("ix_audit_events_seq", "seq", unique=True),
)

audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
)


class AuditError(RuntimeError):
    """The audit log cannot be written (no chain head: the schema is not migrated)."""


@dataclass(frozen=True)
class Event:
    actor: str
    action: str
    recording_id: str | None
    reason: str
    outcome: str
    purpose: str = ""
    detail: str = ""


def canonical(values: dict[str, Any]) -> bytes:
    """The bytes an entry's hash covers (see the module docstring)."""
    content = {
        "v": CHAIN_VERSION,
        "seq": int(values["seq"]),
        "at_ms": int(values["at_ms"]),
        "actor": values["actor"],
        "action": values["action"],
        "recording_id": values["recording_id"],
        "purpose": values["purpose"],
        "reason": values["reason"],
        "outcome": values["outcome"],
        "detail": values["detail"],
        "prev": values["prev_hash"],
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def entry_hash(values: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(values)).hexdigest()


def append_event(conn: sa.Connection, event: Event, at_ms: int | None = None) -> int:
    """Add one event inside the caller's transaction; returns its ``seq``."""
    return append_events(conn, [event], at_ms)[0]


def append_events(
    conn: sa.Connection, events: Sequence[Event], at_ms: int | None = None
) -> list[int]:
    """Add several events, in order, inside the caller's transaction; returns their
    ``seq``s. The same chain as one ``append_event`` per event, in three statements:
    the head is advanced by ``len(events)`` first (which serialises appenders as
    ``append_event`` does), the entries are chained here and inserted together, and
    the head's hash is set to the last one."""
    if not events:
        return []
    head = conn.execute(
        sa.update(audit_head)
        .where(audit_head.c.id == 1)
        .values(seq=audit_head.c.seq)  # takes the lock, changes nothing
        .returning(audit_head.c.seq, audit_head.c.last_hash)
    ).first()
    if head is None:
        raise AuditError("audit chain head missing: the catalog is not migrated")
    last_at = conn.execute(
        sa.select(audit_events.c.at_ms).where(audit_events.c.seq == head.seq)
    ).scalar()
    when = max(now_ms() if at_ms is None else at_ms, int(last_at or 0))
    prev, first = str(head.last_hash), int(head.seq) + 1
    entries: list[dict[str, Any]] = []
    for seq, event in enumerate(events, first):
        values: dict[str, Any] = {
            "seq": seq,
            "at_ms": when,
            "actor": event.actor[:200],
            "action": event.action[:32],
            "recording_id": event.recording_id[:32] if event.recording_id else None,
            "purpose": event.purpose[:16],
            "reason": event.reason[:200],
            "outcome": event.outcome[:32],
            "detail": event.detail[:400],
            "prev_hash": prev,
        }
        values["entry_hash"] = prev = entry_hash(values)
        entries.append(values)
    conn.execute(sa.insert(audit_events), entries)
    conn.execute(
        sa.update(audit_head)
        .where(audit_head.c.id == 1)
        .values(seq=entries[-1]["seq"], last_hash=prev)
    )
    return [e["seq"] for e in entries]


def append(
    conn: sa.Connection,
    actor: str,
    action: str,
    recording_id: str | None,
    reason: str,
    outcome: str,
    at_ms: int | None = None,
    purpose: str = "",
    detail: str = "",
) -> int:
    """Add one event inside the caller's transaction (positional form of the sweeper)."""
    event = Event(actor, action, recording_id, reason, outcome, purpose, detail)
    return append_event(conn, event, at_ms)


def events_for(conn: sa.Connection, recording_id: str) -> list[sa.Row[tuple[object, ...]]]:
    query = (
        sa.select(audit_events)
        .where(audit_events.c.recording_id == recording_id)
        .order_by(audit_events.c.seq)
    )
    return list(conn.execute(query))


# ---------------------------------------------------------------- verification


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    head_hash: str
    problem: str = ""  # names the first bad entry
    bad_seq: int | None = None


def _rows(catalog: Catalog, batch: int = 2000) -> Iterator[dict[str, Any]]:
    after = 0
    while True:
        query = (
            sa.select(audit_events)
            .where(audit_events.c.seq > after)
            .order_by(audit_events.c.seq)
            .limit(batch)
        )
        with catalog.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        yield from rows
        if len(rows) < batch:
            return
        after = int(rows[-1]["seq"])


def _check_entry(row: dict[str, Any], expected_seq: int, prev: str) -> str:
    """What is wrong with this entry, or ''."""
    seq, where = int(row["seq"]), f"entry seq={row['seq']} (event_id={row['event_id']})"
    if seq != expected_seq:
        return (
            f"entry seq={expected_seq} is missing (removed); the log jumps to {where}"
            if seq > expected_seq
            else f"{where}: duplicate or out of order"
        )
    if row["prev_hash"] != prev:
        return (
            f"{where}: does not follow entry seq={seq - 1} "
            "(an entry was removed, reordered, or its predecessor rewritten)"
        )
    if entry_hash(row) != row["entry_hash"]:
        return f"{where}: its content was changed after it was written"
    return ""


def read_head(catalog: Catalog) -> tuple[int, str] | None:
    with catalog.engine.connect() as conn:
        found = conn.execute(
            sa.select(audit_head.c.seq, audit_head.c.last_hash).where(audit_head.c.id == 1)
        ).first()
    return None if found is None else (int(found.seq), str(found.last_hash))


def verify(catalog: Catalog) -> Verdict:
    """Walk the chain from the first entry; the verdict names the first bad one."""
    head = read_head(catalog)
    expected, prev = 1, GENESIS
    for row in _rows(catalog):
        problem = _check_entry(row, expected, prev)
        if problem:
            return Verdict(False, expected - 1, prev, problem, expected)
        expected, prev = expected + 1, str(row["entry_hash"])
    count = expected - 1
    if head is None:
        return Verdict(False, count, prev, "the chain head (audit_head) is missing", count + 1)
    if head != (count, prev):
        return Verdict(
            False,
            count,
            prev,
            f"the log ends at entry seq={count} but its head records seq={head[0]}: "
            f"entries seq={count + 1}..{head[0]} were removed from the end, "
            "or the head was changed",
            count + 1,
        )
    return Verdict(True, count, prev)
