"""The audit log: an append-only table of what was done to which recording, by whom
and why. Rows are only ever inserted (the hash chain of issue 8 builds on this).

``append`` takes the caller's connection, so an event commits or rolls back together
with the change it describes (the sweeper deletes a row and records it in one
transaction, which is why each destruction is audited exactly once).
"""

from __future__ import annotations

import sqlalchemy as sa

from agent.store.catalog import metadata, now_ms

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
    sa.Index("ix_audit_events_recording", "recording_id"),
    sa.Index("ix_audit_events_at", "at_ms"),
)


def append(
    conn: sa.Connection,
    actor: str,
    action: str,
    recording_id: str | None,
    reason: str,
    outcome: str,
    at_ms: int | None = None,
) -> None:
    """Add one event inside the caller's transaction."""
    conn.execute(
        sa.insert(audit_events).values(
            at_ms=now_ms() if at_ms is None else at_ms,
            actor=actor,
            action=action,
            recording_id=recording_id,
            reason=reason,
            outcome=outcome,
        )
    )


def events_for(conn: sa.Connection, recording_id: str) -> list[sa.Row[tuple[object, ...]]]:
    query = (
        sa.select(audit_events)
        .where(audit_events.c.recording_id == recording_id)
        .order_by(audit_events.c.event_id)
    )
    return list(conn.execute(query))
