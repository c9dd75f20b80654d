"""A returning agent's tail (issue 19): a live call the store finished itself.

When no append arrives for ``live_timeout`` the store finishes the call as
``incomplete`` and archives what it has; its agent host may only have been lost for a
while (killed, restarted, cut off). The archiver then keeps the call's segments (state
``held``) for ``live_tail_window``, so an agent that comes back with a longer copy
appends the rest from the store's durable sizes (``LiveStore._reopen``: the call is live
again, same data key, no byte twice) and finishes it as usual. The archive built from
the finished call *replaces* the first one in the same catalog row: new blob under a
new data key, the row's end, flags (``incomplete`` cleared when the agent's copy is
whole), size and sha256 updated in one transaction with an audit entry
(``tail_appended``), then the old blob's key is shredded and its blob deleted. A row
destroyed meanwhile (erased, discarded) is not brought back. All of it is state in the
catalog and the blob store, so any replica may take the tail.
"""

from __future__ import annotations

import sqlalchemy as sa

from agent import logs
from agent.store.archive.vault import KeyShredded, Vault, lock_whole_key
from agent.store.audit import chain as audit
from agent.store.catalog import RecordingRow, live_recordings, now_ms, recordings
from agent.store.live import archive_queue
from agent.store.live.rows import FINISHED, HELD, LiveRow
from agent.store.live.segments import LiveStore

log = logs.get_logger(__name__)

REASON = "its agent came back after live_timeout with the rest of the call"
# What a replacement changes of the stored row (the call's facts stay as stored).
REPLACED = (
    "ended_at_ms", "flags", "audio_format", "channels", "size", "sha256", "blob_key",
    "employee_id", "employee_name", "employee_team", "employees_json", "pauses_json",
)  # fmt: skip


def hold(live: LiveStore, row: LiveRow) -> bool:
    """After a timed-out call's archive: keep its segments for the tail window (False:
    it was reopened meanwhile; its next archive replaces this one)."""
    with live.catalog.engine.begin() as conn:
        held = conn.execute(
            sa.update(live_recordings)
            .where(live_recordings.c.recording_id == row.recording_id)
            .where(live_recordings.c.state == FINISHED)
            .values(state=HELD, last_append_ms=now_ms(), claimed_until_ms=None)
            .returning(live_recordings.c.recording_id)
        ).first()
    return held is not None


def release_held(live: LiveStore, limit: int = 100) -> int:
    """Segments of held calls past the tail window: removed (their rows stay archived,
    to answer a late agent ALREADY_EXISTS); of held calls whose recording is being
    destroyed or gone (erased, expired): removed at once (the row stays, so that a
    returning agent is told, not taken for a new call). Returns the calls released."""
    gone = _destroyed(live, limit)
    for rid in gone:
        if (row := live.get(rid)) is not None and row.state == HELD:
            forget_destroyed(live, row)
    due = archive_queue.stale(live, now_ms() - live.tail_window_ms, limit, state=HELD)
    released = len(gone)
    for rid in due:
        row = live.get(rid)
        if row is not None and row.state == HELD and not live.reopenable(row):
            archive_queue.remove(live, row)
            released += 1
            log.info("live_tail_window_closed", recording_id=rid)
    return released


def _destroyed(live: LiveStore, limit: int) -> list[str]:
    """Held calls with no recording row that is not being destroyed."""
    kept = (
        sa.select(recordings.c.recording_id)
        .where(recordings.c.recording_id == live_recordings.c.recording_id)
        .where(recordings.c.destroy_reason.is_(None))
    )
    query = (
        sa.select(live_recordings.c.recording_id)
        .where(live_recordings.c.state == HELD)
        .where(~kept.exists())
        .limit(limit)
    )
    with live.catalog.engine.connect() as conn:
        return [rid for (rid,) in conn.execute(query)]


def replace_archive(vault: Vault, stored: RecordingRow, new: RecordingRow) -> bool:
    """Put ``new`` (its blob already stored) in place of ``stored``, audited; the old
    blob goes. False: the stored row changed or is being destroyed (the new blob goes)."""
    rid = stored.recording_id
    values = {name: getattr(new, name) for name in REPLACED}
    detail = (
        f"audio {stored.duration_ms / 1000:.1f} s -> {new.duration_ms / 1000:.1f} s; "
        f"flags {stored.flags or '-'} -> {new.flags or '-'}"
    )
    with vault.catalog.engine.begin() as conn:
        if not lock_whole_key(conn, new.blob_key):
            raise KeyShredded(rid, "its new data key was removed as an orphan before its row")
        replaced = conn.execute(
            sa.update(recordings)
            .where(recordings.c.recording_id == rid)
            .where(recordings.c.blob_key == stored.blob_key)
            .where(recordings.c.destroy_reason.is_(None))
            .values(**values)
            .returning(recordings.c.recording_id)
        ).first()
        if replaced is not None:
            audit.append(
                conn, "store", "tail_appended", rid, REASON, "archive_replaced", detail=detail
            )
    if replaced is None:
        vault.discard(rid, new.blob_key)
        return False
    vault.discard(rid, stored.blob_key)  # its key shredded first, then the blob
    log.warning(
        "live_tail_appended", recording_id=rid, audio_s=round(new.duration_ms / 1000, 1),
        was_s=round(stored.duration_ms / 1000, 1), flags=new.flags or "-",
    )  # fmt: skip
    return True


def forget_destroyed(live: LiveStore, row: LiveRow) -> None:
    """A held or reopened call whose stored recording is gone (erased, expired): its
    tail is not stored again; the segments go."""
    archive_queue.remove(live, row)
    log.warning("live_tail_dropped", recording_id=row.recording_id, reason="recording destroyed")
