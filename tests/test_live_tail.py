"""A returning agent's tail (issue 19), against a real store (in-process, port 0): a
live call the store finished itself as ``incomplete`` (its agent silent for
``live_timeout``) takes the rest of the call from the agent when it comes back within
``live_tail_window``: appended from the store's durable sizes (bytes sent twice are
skipped), finished with the agent's manifest, archived again in place of the first
archive (one row, the old blob destroyed, ``incomplete`` cleared), audited. After the
window the agent is told ALREADY_EXISTS and keeps its copy, as before; an erasure
meanwhile takes the held segments with it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.archive.vault import open_storage
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, RecordingRow, data_keys, live_segments
from agent.store.live import archive_queue
from agent.store.live.archiver import LiveArchiver
from agent.store.live.segments import LiveStore
from agent.store.retention.sweeper import Sweeper
from tests.support.audio import probe
from tests.support.stack import InProcessStore, store_config
from tests.test_live_store import (
    SECOND,
    append,
    archive_audio,
    finish,
    live_manifest,
    tone,
    wait_stored,
)


def _store(tmp_path: Path, window_s: float) -> InProcessStore:
    config = store_config(tmp_path)
    return InProcessStore(
        dataclasses.replace(config, live_timeout_s=2.0, live_tail_window_s=window_s)
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InProcessStore]:
    with _store(tmp_path, 3600.0) as running:
        yield running


def _wait_replaced(store: InProcessStore, rid: str, old_blob: str) -> RecordingRow:
    catalog = Catalog(store.config.catalog_url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = catalog.get(rid)
            if row is not None and row.blob_key != old_blob:
                return row
            time.sleep(0.1)
    finally:
        catalog.close()
    raise AssertionError(f"{rid}: the archive was not replaced")


def _facts(store: InProcessStore, rid: str, blob: str) -> tuple[int, list[str], bool]:
    """Rows of the recording, its audit actions, whether ``blob``'s key is whole."""
    catalog = Catalog(store.config.catalog_url)
    try:
        with catalog.engine.connect() as conn:
            rows = sum(1 for r in catalog.list(limit=100) if r.recording_id == rid)
            actions = [e.action for e in audit.events_for(conn, rid)]
            key = conn.execute(data_keys.select().where(data_keys.c.blob_key == blob)).first()
            segments = conn.execute(
                live_segments.select().where(live_segments.c.recording_id == rid)
            ).first()
        assert segments is None, "segments left after the second archive"
        return rows, actions, key is not None and key.wrapped_key is not None
    finally:
        catalog.close()


def test_a_returning_agents_tail_is_appended_and_the_archive_replaced(
    store: InProcessStore, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(6, 440), tone(6, 660)
    with grpc.insecure_channel(store.address) as channel:
        stub = pb_grpc.LiveStub(channel)
        append(stub, manifest, ("customer", 0, customer[: 3 * SECOND]))
        append(stub, manifest, ("employee", 0, employee[: 3 * SECOND]))
        first = wait_stored(store, rid, timeout=20)  # live_timeout = 2 s: finished here
        assert "incomplete" in first.flags.split(",") and abs(first.duration_ms - 3000) <= 5

        # The agent is back: the store asks for the rest from its durable sizes.
        state = stub.Query(pb.LiveQueryRequest(recording_id=rid), timeout=5)
        assert state.known and not state.finished
        assert {s.leg: s.size for s in state.legs} == {
            "customer": 3 * SECOND,
            "employee": 3 * SECOND,
        }
        sizes = append(  # from 2 s: its first second is held already and is skipped
            stub,
            manifest,
            ("customer", 2 * SECOND, customer[2 * SECOND :]),
            ("employee", 3 * SECOND, employee[3 * SECOND :]),
        )
        assert sizes == {"customer": 6 * SECOND, "employee": 6 * SECOND}
        assert finish(stub, manifest, customer, employee).finished  # the sha256 of 6 s
        row = _wait_replaced(store, rid, first.blob_key)

    assert row.flags == "" and row.duration_ms == 6000  # the agent's copy was whole
    assert row.stored_at_ms == first.stored_at_ms and row.call_ref == first.call_ref
    channels, _, seconds = probe(archive_audio(store, row, tmp_path / "a.ogg"))
    assert channels == 2 and abs(seconds - 6.0) < 0.1
    rows, actions, old_key_whole = _facts(store, rid, first.blob_key)
    assert rows == 1 and "tail_appended" in actions
    assert not old_key_whole  # the first archive's key shredded, its blob gone
    assert list(store.config.blobs_dir.rglob(f"{row.blob_key}*"))  # (where blobs are)
    assert not list(store.config.blobs_dir.rglob(f"{first.blob_key}*"))


def test_after_the_tail_window_a_returning_agent_is_told_and_keeps_its_copy(
    tmp_path: Path,
) -> None:
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(2, 440), tone(2, 660)
    with _store(tmp_path, 0.5) as store, grpc.insecure_channel(store.address) as channel:
        stub = pb_grpc.LiveStub(channel)
        append(stub, manifest, ("customer", 0, customer), ("employee", 0, employee))
        first = wait_stored(store, rid, timeout=20)
        deadline = time.monotonic() + 20
        while not stub.Query(pb.LiveQueryRequest(recording_id=rid), timeout=5).finished:
            assert time.monotonic() < deadline, "the tail window never closed"
            time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as refused:
            append(stub, manifest, ("customer", 2 * SECOND, tone(1, 440)))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as late:
            finish(stub, manifest, customer + tone(1, 440), employee)
        assert late.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert wait_stored(store, rid).blob_key == first.blob_key  # unchanged


def test_an_erased_recording_loses_its_held_segments_and_takes_no_tail(
    store: InProcessStore, tmp_path: Path
) -> None:
    """A data-subject erasure of the incomplete recording while its segments are held:
    they go at once (not at the window's end), and a returning agent is told, not taken
    for a new call."""
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(2, 440), tone(2, 660)
    with grpc.insecure_channel(store.address) as channel:
        stub = pb_grpc.LiveStub(channel)
        append(stub, manifest, ("customer", 0, customer), ("employee", 0, employee))
        wait_stored(store, rid, timeout=20)
        assert list(store.config.blobs_dir.rglob(f"live-{rid}-*"))  # held
        storage = open_storage(store.config)
        try:
            assert Sweeper(storage.catalog, storage.vault, retention_months=6).destroy(rid)
        finally:
            storage.catalog.close()
        deadline = time.monotonic() + 10
        while list(store.config.blobs_dir.rglob(f"live-{rid}-*")):
            assert time.monotonic() < deadline, "held segments outlived the erasure"
            time.sleep(0.2)
        assert stub.Query(pb.LiveQueryRequest(recording_id=rid), timeout=5).finished
        with pytest.raises(grpc.RpcError) as again:  # not a new call either
            append(stub, manifest, ("customer", 0, customer + tone(1, 440)))
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as late:
            finish(stub, manifest, customer + tone(1, 440), employee)
        assert late.value.code() == grpc.StatusCode.ALREADY_EXISTS
    catalog = Catalog(store.config.catalog_url)
    try:
        assert catalog.get(rid) is None
    finally:
        catalog.close()


def test_a_tail_before_the_first_archive_is_stored_once(tmp_path: Path) -> None:
    """The agent comes back after the timeout but before any archiver took the call:
    the call is reopened, finished by its agent and archived once, whole, unflagged
    (the store's own parts, no gRPC: an archiver that is not running)."""
    config = dataclasses.replace(store_config(tmp_path), live_timeout_s=0.0)
    storage = open_storage(config)
    try:
        live = LiveStore(storage.catalog, storage.vault, tmp_path / "work")
        archiver = LiveArchiver(live, timeout_s=0.0)
        manifest = live_manifest(tmp_path)
        rid = manifest.recording_id
        customer, employee = tone(6, 440), tone(6, 660)
        assert live.create(manifest)
        row = live.get(rid)
        assert row is not None
        half = [pb.LegBytes(leg="customer", offset=0, data=customer[: 3 * SECOND])]
        live.append(row, half)
        time.sleep(0.01)
        assert archiver.expire_stale() == [rid]  # finished as incomplete, not archived
        rest = [
            pb.LegBytes(leg="customer", offset=3 * SECOND, data=customer[3 * SECOND :]),
            pb.LegBytes(leg="employee", offset=0, data=employee),
        ]
        assert live.append(row, rest) == {"customer": 6 * SECOND, "employee": 6 * SECOND}
        reopened = live.get(rid)
        assert reopened is not None and reopened.state == "live"
        final = pb.Manifest()
        final.CopyFrom(manifest)
        final.ended_at.FromDatetime(
            manifest.started_at.ToDatetime(dt.UTC) + dt.timedelta(seconds=6)
        )
        legs = {
            leg: (len(data), hashlib.sha256(data).hexdigest())
            for leg, data in (("customer", customer), ("employee", employee))
        }
        live.finish(reopened, final, legs)
        claimed = archive_queue.claim(live, 60.0)
        assert claimed is not None
        archiver.archive(claimed)
        stored = storage.catalog.get(rid)
        assert stored is not None and stored.flags == "" and stored.duration_ms == 6000
        assert [r.recording_id for r in storage.catalog.list(limit=10)] == [rid]
        gone = live.get(rid)
        assert gone is not None and gone.state == "archived"  # not held: its agent finished it
    finally:
        storage.catalog.close()
