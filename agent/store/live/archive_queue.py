"""The end of a live call's segments in the store.

A finished recording (the agent's Finish, or a stale one finished by the store as
``incomplete``: ``stale`` lists those) waits in ``live_recordings`` until an archiver
(``agent.store.live.archiver``) ``claim``s it with a lease (on several replicas each is
encoded once), encodes and stores the archive, then ``remove``s the segments: blobs
first, then their rows; the recording's row stays ``archived`` for ARCHIVED_KEEP_MS to
answer a late finish (``forget_archived``). A discarded recording's live call is
``destroy``ed at once, data key first.
"""

from __future__ import annotations

import sqlalchemy as sa

from agent import logs
from agent.store.catalog import live_recordings, live_segments, now_ms
from agent.store.live.rows import ARCHIVED, FINISHED, LIVE, LiveRow
from agent.store.live.segments import LiveStore, blob_keys

log = logs.get_logger(__name__)

ARCHIVED_KEEP_MS = 24 * 3600 * 1000


def stale(live: LiveStore, older_than_ms: int, limit: int = 100, state: str = LIVE) -> list[str]:
    """Recordings in ``state`` with no append since ``older_than_ms``: live ones whose
    agent is gone, or held ones whose tail window has closed."""
    with live.catalog.engine.connect() as conn:
        return [
            rid
            for (rid,) in conn.execute(
                sa.select(live_recordings.c.recording_id)
                .where(live_recordings.c.state == state)
                .where(live_recordings.c.last_append_ms < older_than_ms)
                .limit(limit)
            )
        ]


def claim(live: LiveStore, lease_s: float) -> LiveRow | None:
    """One finished recording no one else is encoding, leased to the caller."""
    now = now_ms()
    free = sa.or_(
        live_recordings.c.claimed_until_ms.is_(None),
        live_recordings.c.claimed_until_ms < now,
    )
    with live.catalog.engine.connect() as conn:
        candidates = [
            rid
            for (rid,) in conn.execute(
                sa.select(live_recordings.c.recording_id)
                .where(live_recordings.c.state == FINISHED)
                .where(free)
                .limit(8)
            )
        ]
    for rid in candidates:
        with live.catalog.engine.begin() as conn:
            got = conn.execute(
                sa.update(live_recordings)
                .where(live_recordings.c.recording_id == rid)
                .where(free)
                .values(claimed_until_ms=now + int(lease_s * 1000))
                .returning(live_recordings.c.recording_id)
            ).first()
        if got is not None:
            return live.get(rid)
    return None


def remove(live: LiveStore, row: LiveRow) -> int:
    """The segments' blobs, then their rows; the recording's row stays, archived
    (a late finish is answered from it). Returns the blobs removed."""
    rid = row.recording_id
    with live.catalog.engine.connect() as conn:
        keys = blob_keys(conn, rid)
    failed = live.vault.blobs.delete_many(keys)
    if failed:
        raise OSError(f"live segments of {rid} not removed: {sorted(failed)[:3]}")
    with live.catalog.engine.begin() as conn:
        conn.execute(sa.delete(live_segments).where(live_segments.c.recording_id == rid))
        conn.execute(
            sa.update(live_recordings)
            .where(live_recordings.c.recording_id == rid)
            .values(state=ARCHIVED, last_append_ms=now_ms())
        )
    return len(keys)


def destroy(live: LiveStore, rid: str) -> int:
    """Everything the store holds of a live call (a discarded recording, issue 21):
    the call's row first (its wrapped data key: the segments can no longer be
    read), then the segments' blobs and rows. Returns the blobs removed."""
    with live.catalog.engine.begin() as conn:
        keys = blob_keys(conn, rid)
        conn.execute(sa.delete(live_recordings).where(live_recordings.c.recording_id == rid))
    live.vault.blobs.delete_many(keys)
    with live.catalog.engine.begin() as conn:
        conn.execute(sa.delete(live_segments).where(live_segments.c.recording_id == rid))
    live.forget_key(rid)
    log.info("live_destroyed", recording_id=rid, blobs=len(keys))
    return len(keys)


def forget_archived(live: LiveStore) -> int:
    """Rows of archived recordings past ARCHIVED_KEEP_MS (a late finish is told by then)."""
    with live.catalog.engine.begin() as conn:
        result = conn.execute(
            sa.delete(live_recordings)
            .where(live_recordings.c.state == ARCHIVED)
            .where(live_recordings.c.last_append_ms < now_ms() - ARCHIVED_KEEP_MS)
        )
    return int(result.rowcount or 0)
