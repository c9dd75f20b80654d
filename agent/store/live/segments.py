"""Live recordings in the store: the legs of calls that are still going on.

Each append is made durable before its offsets are acknowledged: the new bytes of each
leg are encrypted under the recording's own data key (``agent.store.crypto``; the
recording id, leg and offset are bound into every tag) into one blob per append
(``live-<id>-<random>``) in the blob store every replica sees, written outside any
lock so that appends of different calls reach the disk in parallel; then, in a
transaction holding the recording's row lock (the write lock on SQLite) and shared
with the other appends committing at that moment (one commit for the group,
``agent.store.live.commits``), the leg sizes are checked again and the pieces' rows
go into ``live_segments``. An append that lost a race (two replicas, one retried
request) deletes its blob and answers ABORTED. A leg's durable size is the end of its
last segment, so a resume on any replica continues from there. (A store killed between
a blob's write and its rows leaves that blob behind; its data key goes with the
recording's row.)

A finished recording (the agent's Finish, or a stale one finished by the store as
``incomplete``) waits in ``live_recordings`` with its final manifest until an archiver
(``agent.store.live.archiver``) claims it with a lease, encodes the stereo archive and
removes the segments (``agent.store.live.archive_queue``). A call the store finished
itself (timed out) keeps its segments for ``tail_window_s`` after its archive (state
``held``): an agent that comes back with a longer copy appends the rest, which reopens
the call (``agent.store.live.tail``). The row, its states and legs:
``agent.store.live.rows``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format

from agent import g711, logs
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.archive.crypto import (
    HEADER_BYTES,
    Header,
    decrypt_chunks,
    encrypt_stream,
    new_data_key,
)
from agent.store.archive.vault import Vault
from agent.store.catalog import Catalog, live_recordings, live_segments, now_ms
from agent.store.keys.master import key_context
from agent.store.live.commits import GroupCommit, RunningDigests, chain_step
from agent.store.live.rows import (
    ALL_LEGS,
    FINISHED,
    HELD,
    LIVE,
    LiveRejected,
    LiveRow,
    row_from,
)

log = logs.get_logger(__name__)

KEY_CACHE = 4096


@dataclass(frozen=True)
class _Append:
    """One append's pieces, written to ``blob_key`` at ``placed`` (at, length)."""

    rid: str
    blob_key: str
    plan: list[tuple[str, int, bytes]]
    placed: list[tuple[int, int]]


def _label(recording_id: str, leg: str, offset: int) -> str:
    """What each segment's AES-GCM tags are bound to: no segment can stand in for another."""
    return f"{recording_id}:{leg}:{offset}"


def blob_keys(conn: sa.Connection, rid: str) -> list[str]:
    """The blobs holding a recording's segments (its legs share them)."""
    query = sa.select(live_segments.c.blob_key).where(live_segments.c.recording_id == rid)
    return sorted({k for (k,) in conn.execute(query.distinct())})


class LiveStore:
    def __init__(
        self, catalog: Catalog, vault: Vault, work_dir: Path, tail_window_s: float = 3600.0
    ) -> None:
        self.catalog = catalog
        self.vault = vault
        self.work_dir = work_dir
        self.tail_window_ms = int(tail_window_s * 1000)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._keys: dict[str, bytes] = {}
        self._keys_lock = threading.Lock()
        self._commits = GroupCommit(catalog.engine, LiveRejected)
        self.digests = RunningDigests()

    # ------------------------------------------------------------ reading

    def get(self, recording_id: str) -> LiveRow | None:
        with self.catalog.engine.connect() as conn:
            found = conn.execute(
                sa.select(live_recordings).where(live_recordings.c.recording_id == recording_id)
            ).first()
        return row_from(found) if found else None

    def sizes(self, recording_id: str, conn: sa.Connection | None = None) -> dict[str, int]:
        """Each leg's durable size (the end of its last segment)."""
        query = (
            sa.select(
                live_segments.c.leg,
                sa.func.max(live_segments.c.offset + live_segments.c.length),
            )
            .where(live_segments.c.recording_id == recording_id)
            .group_by(live_segments.c.leg)
        )
        if conn is not None:
            return {leg: int(end) for leg, end in conn.execute(query)}
        with self.catalog.engine.connect() as own:
            return {leg: int(end) for leg, end in own.execute(query)}

    def state(self, recording_id: str) -> pb.LiveState:
        row = self.get(recording_id)
        if row is None:
            stored = self.catalog.get(recording_id)
            return pb.LiveState(recording_id=recording_id, known=False, finished=stored is not None)
        if row.state != LIVE and row.final is not None:
            sizes = {leg: int(v["size"]) for leg, v in row.final["legs"].items()}
        else:
            sizes = self.sizes(recording_id)
        # A call timed out here takes the rest from its agent (an append reopens it).
        open_ = row.state == LIVE or self.reopenable(row)
        return pb.LiveState(
            recording_id=recording_id,
            known=True,
            legs=[pb.LegSize(leg=leg, size=sizes.get(leg, 0)) for leg in row.legs],
            finished=not open_,
            encoding=g711.to_pb(row.encoding),
        )

    def data_key(self, row: LiveRow) -> bytes:
        """The call's data key, unwrapped once per call while it is live (every append
        needs it; the cache holds at most KEY_CACHE calls' keys, in memory only)."""
        cached = self._keys.get(row.recording_id)
        if cached is not None:
            return cached
        context = key_context(row.recording_id, f"live-{row.recording_id}")
        fresh = self.get(row.recording_id) or row  # re-wrapped since (key rotation)?
        key = self.vault.wrapper.unwrap(fresh.key_id, fresh.wrapped_key, context)
        with self._keys_lock:
            while len(self._keys) >= KEY_CACHE:
                self._keys.pop(next(iter(self._keys)))
            self._keys[row.recording_id] = key
        return key

    def forget_key(self, rid: str) -> None:
        with self._keys_lock:
            self._keys.pop(rid, None)
        self.digests.forget(rid, ALL_LEGS)

    def _segments(self, rid: str, leg: str) -> list[sa.Row[Any]]:
        with self.catalog.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(live_segments)
                    .where(live_segments.c.recording_id == rid)
                    .where(live_segments.c.leg == leg)
                    .order_by(live_segments.c.offset)
                )
            )

    def read_leg(
        self,
        row: LiveRow,
        leg: str,
        data_key: bytes | None = None,
        start: int = 0,
        segments: list[sa.Row[Any]] | None = None,
    ) -> Iterator[bytes]:
        """The leg's bytes as stored (in the call's encoding) from ``start`` (a
        segment's offset), segment by segment (decrypted and authenticated)."""
        key = data_key or self.data_key(row)
        if segments is None:
            segments = self._segments(row.recording_id, leg)
        expected = start
        for segment in segments:
            if segment.offset < start:
                continue
            if segment.offset != expected:
                raise LiveRejected(
                    grpc.StatusCode.DATA_LOSS,
                    f"leg {leg}: segment at {segment.offset}, expected {expected}",
                )
            label = _label(row.recording_id, leg, segment.offset)
            sealed = b"".join(
                self.vault.blobs.read(segment.blob_key, segment.blob_at, segment.blob_length)
            )
            header = Header.unpack(sealed, label)
            yield from decrypt_chunks(key, label, header, [sealed[HEADER_BYTES:]])
            expected += segment.length

    def leg_digest(self, row: LiveRow, leg: str, upto: int | None = None) -> tuple[int, str]:
        """The leg's size and sha256 (of its first ``upto`` bytes, when given): from the
        running digest where this store saw the appends (if its chain still names the
        catalog's first segments: nothing was discarded and sent again since), read
        back for the rest."""
        segments = self._segments(row.recording_id, leg)
        digest, size = hashlib.sha256(), 0
        running = self.digests.get(row.recording_id, leg)
        if running is not None and (upto is None or running[1] <= upto):
            chain = hashlib.sha256()
            for segment in segments:
                if segment.offset + segment.length > running[1]:
                    break
                chain_step(chain, segment.offset, segment.blob_key)
            if chain.hexdigest() == running[2]:
                digest, size, _ = running
        for block in self.read_leg(row, leg, start=size, segments=segments):
            block = block if upto is None else block[: upto - size]
            if not block:
                break
            digest.update(block)
            size += len(block)
        return size, digest.hexdigest()

    # ------------------------------------------------------------ writing

    def create(self, manifest: pb.Manifest, encoding: str = g711.PCM16) -> bool:
        """The recording's row with a fresh data key, its legs arriving in ``encoding``;
        False if it is already there."""
        rid = manifest.recording_id
        key_id, wrapped = self.vault.wrapper.wrap(new_data_key(), key_context(rid, f"live-{rid}"))
        now = now_ms()
        values = {
            "recording_id": rid,
            "site": manifest.site,
            "state": LIVE,
            "manifest_json": json_format.MessageToJson(manifest, indent=None),
            "key_id": key_id,
            "wrapped_key": wrapped,
            "created_at_ms": now,
            "last_append_ms": now,
            "encoding": encoding,
        }
        try:
            with self.catalog.engine.begin() as conn:
                conn.execute(sa.insert(live_recordings).values(**values))
        except sa.exc.IntegrityError:
            return False
        log.info(
            "live_started",
            recording_id=rid,
            site=manifest.site,
            customer=manifest.customer.masked,
            encoding=encoding,
        )
        return True

    def append(self, row: LiveRow, pieces: list[pb.LegBytes]) -> dict[str, int]:
        """Make ``pieces`` durable; returns each leg's size after them. Bytes the store
        already holds are skipped (a retried append), a gap is OUT_OF_RANGE. The blob
        is written here (appends of different calls reach the disk in parallel); its
        rows are committed with whatever other appends wait at the same moment."""
        rid = row.recording_id
        sizes = self.sizes(rid)
        plan = [
            (p.leg, sizes.get(p.leg, 0), _new_bytes(p, sizes.get(p.leg, 0), row.max_leg_bytes))
            for p in pieces
        ]
        plan = [(leg, offset, data) for leg, offset, data in plan if data]
        blob_key = f"live-{rid}-{secrets.token_hex(6)}"
        placed = self._put(self.data_key(row), rid, blob_key, plan) if plan else []
        item = _Append(rid, blob_key, plan, placed)
        try:
            return self._commits.run(
                lambda conn: self._record(conn, item), lambda _: self._digest(item), rid
            )
        except BaseException:
            if plan:
                self.vault.blobs.delete(blob_key)
            raise

    def _digest(self, item: _Append) -> None:
        for leg, offset, data in item.plan:
            self.digests.extend(item.rid, leg, offset, data, item.blob_key)

    def _record(self, conn: sa.Connection, item: _Append) -> dict[str, int]:
        """One append's segment rows, after its leg sizes are checked again under the
        recording's row lock."""
        self._lock(conn, item.rid)
        sizes = self.sizes(item.rid, conn)
        rows = []
        for (leg, offset, data), (at, length) in zip(item.plan, item.placed, strict=True):
            if sizes.get(leg, 0) != offset:
                raise LiveRejected(
                    grpc.StatusCode.ABORTED,
                    f"leg {leg}: another append reached {sizes.get(leg, 0)} first; "
                    "retry from the store's size",
                )
            rows.append({
                "recording_id": item.rid, "leg": leg, "offset": offset, "length": len(data),
                "blob_key": item.blob_key, "blob_at": at, "blob_length": length,
            })  # fmt: skip
            sizes[leg] = offset + len(data)
        if rows:
            conn.execute(sa.insert(live_segments), rows)
        return sizes

    def _lock(self, conn: sa.Connection, rid: str) -> None:
        """The recording's row lock (SQLite: the write lock) until commit; only a live
        recording takes appends."""
        locked = conn.execute(
            sa.update(live_recordings)
            .where(live_recordings.c.recording_id == rid)
            .where(live_recordings.c.state == LIVE)
            .values(last_append_ms=now_ms())
            .returning(live_recordings.c.recording_id)
        ).first()
        if locked is None and not self._reopen(conn, rid):
            raise LiveRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"recording {rid} is finished; nothing more can be appended",
            )

    def reopenable(self, row: LiveRow) -> bool:
        """Finished by the store (timed out) within the tail window: an append reopens it."""
        timed_out = (row.final or {}).get("timed_out_at_ms")
        return (
            row.state in (FINISHED, HELD)
            and timed_out is not None
            and now_ms() - int(timed_out) < self.tail_window_ms
        )

    def reopen(self, rid: str) -> LiveRow | None:
        """Reopen a timed-out call for its agent's finish; the row as it is now."""
        with self.catalog.engine.begin() as conn:
            self._reopen(conn, rid)
        return self.get(rid)

    def _reopen(self, conn: sa.Connection, rid: str) -> bool:
        """A returning agent's tail (in the append's transaction): the call is live
        again, its segments and data key as they were; the archive built meanwhile is
        replaced once it finishes (``reopened_from``). False: not reopenable."""
        found = conn.execute(
            sa.select(live_recordings).where(live_recordings.c.recording_id == rid)
        ).first()
        if found is None or not self.reopenable(row := row_from(found)):
            return False
        doc = {**(row.final or {}), "reopened_from": row.final_from()}
        reopened = conn.execute(
            sa.update(live_recordings)
            .where(live_recordings.c.recording_id == rid)
            .where(live_recordings.c.state == row.state)
            .where(live_recordings.c.final_json == found.final_json)
            .values(state=LIVE, final_json=json.dumps(doc), claimed_until_ms=None)
            .returning(live_recordings.c.recording_id)
        ).first()
        if reopened is not None:
            log.warning("live_reopened", recording_id=rid, site=row.site, was=row.state)
        return reopened is not None

    def _put(
        self, data_key: bytes, rid: str, blob_key: str, plan: list[tuple[str, int, bytes]]
    ) -> list[tuple[int, int]]:
        """One blob holding each piece encrypted on its own; returns (at, length) of each."""
        sealed = self.work_dir / f".live-{secrets.token_hex(8)}.enc"
        placed = []
        fd = os.open(sealed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                for leg, offset, data in plan:
                    at = out.tell()
                    label = _label(rid, leg, offset)
                    encrypt_stream(data_key, label, io.BytesIO(data), len(data), out)
                    placed.append((at, out.tell() - at))
            self.vault.blobs.put_file(blob_key, sealed)
        finally:
            sealed.unlink(missing_ok=True)
        return placed

    def finish(self, row: LiveRow, final: pb.Manifest, legs: dict[str, tuple[int, str]]) -> None:
        """Mark the recording finished with its final manifest, once every leg's durable
        bytes have the agent's size and sha256 (FAILED_PRECONDITION: bytes missing;
        DATA_LOSS: different bytes, the leg is discarded and must be sent again). A
        leg the store holds more of was cut by the agent (the call ended before its
        worker read the BYE, after those bytes went out): its first ``size`` bytes
        are checked, and archived."""
        rid = row.recording_id
        sizes = self.sizes(rid)
        for leg, (size, sha256) in legs.items():
            if sizes.get(leg, 0) < size:
                raise LiveRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"leg {leg}: the store holds {sizes.get(leg, 0)} bytes, finish says {size}; "
                    "append the rest first",
                )
            _, held_sha = self.leg_digest(row, leg, size)
            if held_sha != sha256:
                self.discard_audio(rid)
                raise LiveRejected(
                    grpc.StatusCode.DATA_LOSS,
                    f"leg {leg}: sha256 of the stored bytes is {held_sha}, the agent's is "
                    f"{sha256}; the call's audio was discarded, send it again from 0",
                )
        self.mark_finished(rid, final, legs, expect_state=LIVE, extra=row.carried())
        self.forget_key(rid)

    def mark_finished(
        self,
        rid: str,
        final: pb.Manifest,
        legs: dict[str, tuple[int, str]],
        expect_state: str,
        older_than_ms: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """``extra``: more of the final document (``timed_out_at_ms``, ``reopened_from``)."""
        doc = {
            "manifest": json_format.MessageToDict(final),
            "legs": {leg: {"size": s, "sha256": h} for leg, (s, h) in legs.items()},
            **(extra or {}),
        }
        query = (
            sa.update(live_recordings)
            .where(live_recordings.c.recording_id == rid)
            .where(live_recordings.c.state == expect_state)
            .values(state=FINISHED, final_json=json.dumps(doc))
            .returning(live_recordings.c.recording_id)
        )
        if older_than_ms is not None:
            query = query.where(live_recordings.c.last_append_ms < older_than_ms)
        marked: bool = self._commits.run(
            lambda conn: conn.execute(query).first() is not None, order=rid
        )
        return marked

    def discard_audio(self, rid: str) -> None:
        """Every segment of a recording (its legs share blobs): rows, then blobs."""
        with self.catalog.engine.begin() as conn:
            keys = blob_keys(conn, rid)
            conn.execute(sa.delete(live_segments).where(live_segments.c.recording_id == rid))
        self.digests.forget(rid, ALL_LEGS)
        self.vault.blobs.delete_many(keys)
        log.warning("live_audio_discarded", recording_id=rid, blobs=len(keys))


def _new_bytes(piece: pb.LegBytes, size: int, max_leg_bytes: int) -> bytes:
    """The part of ``piece`` past ``size`` (what the store lacks)."""
    if piece.offset > size:
        raise LiveRejected(
            grpc.StatusCode.OUT_OF_RANGE,
            f"leg {piece.leg}: offset {piece.offset} but the store holds {size} bytes; "
            "resume from the store's size (Query)",
        )
    end = piece.offset + len(piece.data)
    if end > max_leg_bytes:
        raise LiveRejected(
            grpc.StatusCode.OUT_OF_RANGE,
            f"leg {piece.leg}: {end} bytes is longer than a call may last (24 h)",
        )
    return bytes(piece.data[size - piece.offset :]) if end > size else b""
