"""Finalize → outbox → uplink → store, with real ffmpeg, a real gRPC store on port 0
and synthetic captures (the SIP side has its own tests)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import time
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from pydub import AudioSegment
from pydub.generators import Sine

from agent.audio import load
from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Direction,
    Employee,
    Flag,
    iso_ms,
    new_recording_id,
    utc_now,
    write_meta,
)
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.finalize import Finalizer
from agent.recorder.uplink.client import CHANNEL_OPTIONS, Uplink, upload_requests
from agent.recorder.uplink.outbox import Outbox
from agent.store.catalog import Catalog, data_keys
from tests.support.stack import InProcessStore, Keys, agent_config


def make_capture(
    ready: Path, keys: Keys, seconds: float = 3.0, silent_employee: bool = False
) -> CaptureMeta:
    rid = new_recording_id()
    capture = ready / rid
    capture.mkdir(parents=True)
    customer = Sine(440).to_audio_segment(duration=seconds * 1000, volume=-12)
    customer.set_frame_rate(8000).set_sample_width(2).export(
        capture / CUSTOMER_LEG, format="wav"
    ).close()
    employee = (
        AudioSegment.silent(duration=seconds * 1000, frame_rate=8000)
        if silent_employee
        else Sine(1000).to_audio_segment(duration=seconds * 1000 - 400, volume=-12)
    )
    employee.set_frame_rate(8000).set_sample_width(2).export(
        capture / EMPLOYEE_LEG, format="wav"
    ).close()
    end = utc_now()
    start = end - dt.timedelta(seconds=seconds)
    meta = CaptureMeta(
        recording_id=rid,
        site="hel-1",
        source="siprec",
        call_ref="c" * 16,
        direction=Direction.INBOUND,
        started_at=iso_ms(start),
        ended_at=iso_ms(end),
        service_number="+3581005577",
        customer=keys.protector().protect("+358 40 123 4567"),
        employees=(
            Employee("e1001", "Aino Virtanen", "sip:1001@pbx.example", iso_ms(start), "parcels"),
        ),
        legs=(CUSTOMER_LEG, EMPLOYEE_LEG),
    )
    write_meta(capture, meta)
    return meta


def channel_rms(path: Path) -> tuple[float, float]:
    audio = load(path)
    left, right = audio.split_to_mono()
    return float(left.rms), float(right.rms)


def test_capture_becomes_stored_recording(
    tmp_path: Path, keys: Keys, store: InProcessStore
) -> None:
    cfg, _ = agent_config(tmp_path, keys, store.address)
    meta = make_capture(cfg.captures_dir / "ready", keys)
    Finalizer(cfg).handle(meta.recording_id)

    assert not (cfg.captures_dir / "ready" / meta.recording_id).exists(), "raw legs removed"
    outbox = Outbox(cfg.outbox_dir)
    assert outbox.entries() == [meta.recording_id]
    entry = outbox.open(meta.recording_id)
    assert entry.manifest.customer.masked == "+358401234***"
    assert entry.manifest.channels == 2
    left, right = channel_rms(entry.audio_path)
    assert left > 500 and right > 500
    local_sha = hashlib.sha256(entry.audio_path.read_bytes()).hexdigest()

    uplink = Uplink(cfg.uplink, outbox, cfg.quarantine_dir)
    try:
        uplink.handle(meta.recording_id)
    finally:
        uplink.close()
    assert outbox.entries() == [], "deleted after the receipt"

    row = Catalog(store.config.catalog_url).get(meta.recording_id)
    assert row is not None
    assert row.sha256 == local_sha
    assert row.customer_masked == "+358401234***"
    assert row.employee_name == "Aino Virtanen"
    assert row.service_number == "+3581005577"
    assert row.direction == "inbound"
    assert row.duration_ms == row.ended_at_ms - row.started_at_ms
    blob = store.config.blobs_dir / row.blob_key[:2] / row.blob_key
    assert hashlib.sha256(blob.read_bytes()).hexdigest() != local_sha, "encrypted at rest"
    console = pb_grpc.ConsoleStub(grpc.insecure_channel(f"unix:{store.server.console_socket}"))
    request = pb.ExportAudioRequest(
        recording_id=meta.recording_id, reason="test", purpose="verification"
    )
    exported = b"".join(c.data for c in console.ExportAudio(request, timeout=10))
    assert hashlib.sha256(exported).hexdigest() == local_sha, "read back byte-identical"


def test_silent_channel_is_flagged_not_dropped(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1")
    meta = make_capture(cfg.captures_dir / "ready", keys, silent_employee=True)
    Finalizer(cfg).handle(meta.recording_id)
    entry = Outbox(cfg.outbox_dir).open(meta.recording_id)
    assert Flag.SILENT_EMPLOYEE.value in entry.manifest.flags
    assert Flag.SILENT_CUSTOMER.value not in entry.manifest.flags


def test_unreadable_capture_is_quarantined_with_reason(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1")
    broken = cfg.captures_dir / "ready" / new_recording_id()
    broken.mkdir(parents=True)
    (broken / "capture.json").write_text("{not json")
    (broken / CUSTOMER_LEG).write_bytes(b"RIFF....")
    Finalizer(cfg).handle(broken.name)
    moved = cfg.quarantine_dir / broken.name
    assert (moved / CUSTOMER_LEG).exists(), "nothing lost"
    assert "capture.json" in (cfg.quarantine_dir / f"{broken.name}.reason").read_text()


def _stub(store: InProcessStore) -> pb_grpc.IngestStub:
    return pb_grpc.IngestStub(grpc.insecure_channel(store.address, options=CHANNEL_OPTIONS))


def test_broken_stream_resumes_from_committed_size(
    tmp_path: Path, keys: Keys, store: InProcessStore
) -> None:
    cfg, _ = agent_config(
        tmp_path, keys, store.address, uplink={"chunk_bytes": 65536}, audio={"format": "wav"}
    )
    meta = make_capture(cfg.captures_dir / "ready", keys, seconds=10)
    Finalizer(cfg).handle(meta.recording_id)
    outbox = Outbox(cfg.outbox_dir)
    entry = outbox.open(meta.recording_id)
    assert entry.manifest.size > 3 * 65536

    # Send the manifest and two chunks, then drop the stream (no finish).
    def partial():  # type: ignore[no-untyped-def]
        for i, request in enumerate(upload_requests(entry, 0, 65536)):
            if i == 3:
                return
            yield request

    stub = _stub(store)
    with pytest.raises(grpc.RpcError) as err:
        stub.Upload(partial(), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    committed = stub.QueryUpload(
        pb.QueryUploadRequest(recording_id=meta.recording_id)
    ).committed_size
    assert committed == 2 * 65536

    uplink = Uplink(cfg.uplink, outbox, cfg.quarantine_dir)
    try:
        uplink.handle(meta.recording_id)
        assert uplink.bytes_sent == entry.manifest.size - committed
    finally:
        uplink.close()
    row = Catalog(store.config.catalog_url).get(meta.recording_id)
    assert row is not None and row.sha256 == entry.manifest.sha256


def test_upload_is_idempotent(tmp_path: Path, keys: Keys, store: InProcessStore) -> None:
    cfg, _ = agent_config(tmp_path, keys, store.address)
    meta = make_capture(cfg.captures_dir / "ready", keys)
    Finalizer(cfg).handle(meta.recording_id)
    entry = Outbox(cfg.outbox_dir).open(meta.recording_id)
    stub = _stub(store)
    first = stub.Upload(upload_requests(entry, 0, 65536), timeout=10)
    again = stub.Upload(upload_requests(entry, 0, 65536), timeout=10)
    assert again == first
    assert len(Catalog(store.config.catalog_url).list()) == 1


def test_corrupted_bytes_are_refused_and_resent(
    tmp_path: Path, keys: Keys, store: InProcessStore
) -> None:
    cfg, _ = agent_config(tmp_path, keys, store.address)
    meta = make_capture(cfg.captures_dir / "ready", keys)
    Finalizer(cfg).handle(meta.recording_id)
    entry = Outbox(cfg.outbox_dir).open(meta.recording_id)

    def corrupted():  # type: ignore[no-untyped-def]
        for request in upload_requests(entry, 0, 65536):
            if request.WhichOneof("kind") == "chunk" and request.chunk.offset == 0:
                data = bytearray(request.chunk.data)
                data[100] ^= 0xFF
                request.chunk.data = bytes(data)
            yield request

    stub = _stub(store)
    with pytest.raises(grpc.RpcError) as err:
        stub.Upload(corrupted(), timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    catalog = Catalog(store.config.catalog_url)
    assert catalog.get(meta.recording_id) is None
    with catalog.engine.connect() as conn:  # no data key left behind for the bad bytes
        assert conn.execute(sa.select(sa.func.count()).select_from(data_keys)).scalar() == 0
    status = stub.QueryUpload(pb.QueryUploadRequest(recording_id=meta.recording_id))
    assert status.committed_size == 0 and not status.complete
    receipt = stub.Upload(upload_requests(entry, 0, 65536), timeout=10)
    assert receipt.sha256 == entry.manifest.sha256


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("recording_id", "not-an-id", "recording_id"),
        ("sha256", "abc", "sha256"),
        ("size", 0, "size"),
        ("site", "Bad Site!", "site"),
    ],
)
def test_bad_manifest_is_refused_and_leaves_nothing(
    tmp_path: Path, keys: Keys, store: InProcessStore, field: str, value: object, message: str
) -> None:
    cfg, _ = agent_config(tmp_path, keys, store.address)
    meta = make_capture(cfg.captures_dir / "ready", keys)
    Finalizer(cfg).handle(meta.recording_id)
    entry = Outbox(cfg.outbox_dir).open(meta.recording_id)
    setattr(entry.manifest, field, value)
    with pytest.raises(grpc.RpcError) as err:
        _stub(store).Upload(upload_requests(entry, 0, 65536), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert list(store.config.incoming_dir.iterdir()) == []


def test_full_number_in_manifest_is_refused(
    tmp_path: Path, keys: Keys, store: InProcessStore
) -> None:
    cfg, _ = agent_config(tmp_path, keys, store.address)
    meta = make_capture(cfg.captures_dir / "ready", keys)
    Finalizer(cfg).handle(meta.recording_id)
    entry = Outbox(cfg.outbox_dir).open(meta.recording_id)
    entry.manifest.customer.masked = "+358401234567"
    with pytest.raises(grpc.RpcError) as err:
        _stub(store).Upload(upload_requests(entry, 0, 65536), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "masked" in (err.value.details() or "")


def test_store_down_keeps_recording_in_outbox(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:9")
    meta = make_capture(cfg.captures_dir / "ready", keys)
    Finalizer(cfg).handle(meta.recording_id)
    outbox = Outbox(cfg.outbox_dir)
    uplink = Uplink(cfg.uplink, outbox, cfg.quarantine_dir)
    worker = threading.Thread(target=uplink.handle, args=(meta.recording_id,))
    worker.start()
    time.sleep(2)
    uplink.stop_event.set()
    worker.join(15)
    uplink.close()
    assert outbox.entries() == [meta.recording_id]
    assert not cfg.quarantine_dir.exists() or os.listdir(cfg.quarantine_dir) == []
