"""Recordings stopped and discarded at the customer's request (issue 21), and the
audit entry of a stored recording's pauses.

The agent destroys the call's audio on its own disk and sends the call's manifest
without audio (``Ingest.Discard``). The store then removes whatever it holds of the
recording id — a partial upload in ``incoming/`` (part, key, manifest) now; a stored
recording row is marked for erasure (``destroy_reason = "erasure"``) so the sweeper
shreds its key and deletes its blob as for any erasure — and keeps one row in
``discarded_recordings``: the call's facts (masked customer, employees, times) and no
audio, with one audit entry. A repeat finds the row and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from agent import logs
from agent.manifest import call_columns
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, metadata, now_ms, recordings
from agent.store.ingest.partials import Partials

log = logs.get_logger(__name__)

REASON = "discarded at the customer's request"

discarded_recordings = sa.Table(
    "discarded_recordings",
    metadata,
    sa.Column("recording_id", sa.String(32), primary_key=True),
    sa.Column("site", sa.String(63), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("call_ref", sa.String(64), nullable=False),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("started_at_ms", sa.BigInteger, nullable=False),
    sa.Column("ended_at_ms", sa.BigInteger, nullable=False),
    sa.Column("customer_masked", sa.String(32), nullable=False),
    sa.Column("employee_id", sa.String(64), nullable=False),
    sa.Column("employees_json", sa.Text, nullable=False),
    sa.Column("flags", sa.String(400), nullable=False),
    sa.Column("discarded_at_ms", sa.BigInteger, nullable=False),
    sa.Index("ix_discarded_started", "started_at_ms"),
)


@dataclass(frozen=True)
class DiscardedRow:
    recording_id: str
    site: str
    source: str
    call_ref: str
    direction: str
    started_at_ms: int
    ended_at_ms: int
    customer_masked: str
    employee_id: str
    employees_json: str
    flags: str
    discarded_at_ms: int

    @property
    def employees(self) -> list[dict[str, object]]:
        value: list[dict[str, object]] = json.loads(self.employees_json)
        return value


def get(catalog: Catalog, recording_id: str) -> DiscardedRow | None:
    with catalog.engine.connect() as conn:
        found = conn.execute(
            sa.select(discarded_recordings).where(
                discarded_recordings.c.recording_id == recording_id
            )
        ).first()
    return DiscardedRow(**found._mapping) if found else None


def _row(m: pb.Manifest) -> DiscardedRow:
    return DiscardedRow(**call_columns(m), discarded_at_ms=now_ms())


def receipt(row: DiscardedRow) -> pb.UploadReceipt:
    stored = Timestamp()
    stored.FromDatetime(dt.datetime.fromtimestamp(row.discarded_at_ms / 1000, dt.UTC))
    return pb.UploadReceipt(recording_id=row.recording_id, sha256="", size=0, stored_at=stored)


def audit_pauses(catalog: Catalog, m: pb.Manifest) -> None:
    """One audit entry for a stored recording's pauses (who asked, offsets from its
    start): the intervals written as silence are on the record."""
    start = m.started_at.ToMilliseconds()
    detail = "; ".join(
        f"{(p.start.ToMilliseconds() - start) / 1000:.1f}-"
        f"{(p.end.ToMilliseconds() - start) / 1000:.1f} s by {p.who}"
        for p in m.pauses
    )
    with catalog.engine.begin() as conn:
        audit.append(
            conn, f"agent:{m.site}", "pause", m.recording_id, "recording paused", "silence",
            detail=detail,
        )  # fmt: skip


def discard(catalog: Catalog, m: pb.Manifest, partials: Partials, actor: str) -> DiscardedRow:
    """Remove what the store holds of the recording and keep its trace (idempotent)."""
    rid = m.recording_id
    existing = get(catalog, rid)
    if existing is not None:
        partials.discard(rid)
        return existing
    partial = partials.committed_size(rid, None)
    partials.discard(rid)
    removed = [f"{partial} bytes"] if partial else []
    row = _row(m)
    with catalog.engine.begin() as conn:
        marked = conn.execute(
            sa.update(recordings)
            .where(recordings.c.recording_id == rid, recordings.c.destroy_reason.is_(None))
            .values(destroy_reason="erasure", destroy_marked_at_ms=row.discarded_at_ms)
            .returning(recordings.c.recording_id)
        ).first()
        conn.execute(sa.insert(discarded_recordings).values(**row.__dict__))
        held = "stored recording (erased by the sweeper)" if marked else "none"
        detail = f"store held: {held}; partial upload removed: {', '.join(removed) or 'none'}"
        audit.append(conn, actor, "discard", rid, REASON, "discarded", detail=detail)
    log.warning(
        "recording_discarded", recording_id=rid, site=m.site, partial_upload=bool(removed),
        stored_row="marked_for_erasure" if marked else "none",
    )  # fmt: skip
    return row
