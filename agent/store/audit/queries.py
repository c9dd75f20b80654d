"""Reading the audit log for the Access service's AuditLog: entries about a recording,
by a person, in a period, newest first, paged by sequence number. Blocking; the
service runs it in a thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from agent.store.audit.chain import audit_events, audit_head
from agent.store.catalog import Catalog


@dataclass(frozen=True)
class AuditFilter:
    recording_id: str = ""
    actor: str = ""
    since_ms: int | None = None
    until_ms: int | None = None
    before_seq: int = 0


def read(catalog: Catalog, wanted: AuditFilter, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` entries, newest first, and whether more matched."""
    c = audit_events.c
    query = sa.select(audit_events).order_by(c.seq.desc()).limit(limit + 1)
    if wanted.recording_id:
        query = query.where(c.recording_id == wanted.recording_id)
    if wanted.actor:
        query = query.where(c.actor == wanted.actor)
    if wanted.since_ms is not None:
        query = query.where(c.at_ms >= wanted.since_ms)
    if wanted.until_ms is not None:
        query = query.where(c.at_ms < wanted.until_ms)
    if wanted.before_seq > 0:
        query = query.where(c.seq < wanted.before_seq)
    with catalog.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    return rows[:limit], len(rows) > limit


def head(catalog: Catalog) -> tuple[int, str]:
    with catalog.engine.connect() as conn:
        found = conn.execute(sa.select(audit_head.c.seq, audit_head.c.last_hash)).first()
    return (0, "") if found is None else (int(found.seq), str(found.last_hash))
