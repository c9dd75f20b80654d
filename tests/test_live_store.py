"""The store's Live service against a real store (in-process, gRPC on port 0): appends
are durable and encrypted before they are acknowledged, resume from the store's sizes
without duplicating a byte, bad input is refused before anything is written, a finish
checks each leg's sha256, the archive is a stereo Opus file of the call's length, and
a call whose agent vanished is finished as incomplete after the timeout."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.capture import CUSTOMER_LEG, EMPLOYEE_LEG, CaptureMeta, Direction, iso_ms
from agent.manifest import manifest_from_capture
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.archive.vault import open_storage
from agent.store.catalog import Catalog, RecordingRow, live_recordings, live_segments
from agent.testcall.speech import RATE
from tests.support.audio import probe
from tests.support.stack import InProcessStore, make_keys, store_config

SECOND = 16_000  # bytes of one mono 16-bit leg at 8 kHz


def tone(seconds: float, hz: float, phase: int = 0) -> bytes:
    count = int(seconds * 8000)
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * hz * (i + phase) / 8000)))
        for i in range(count)
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InProcessStore]:
    config = dataclasses.replace(store_config(tmp_path), live_timeout_s=2.0)
    with InProcessStore(config) as running:
        yield running


@pytest.fixture
def stub(store: InProcessStore) -> Iterator[pb_grpc.LiveStub]:
    with grpc.insecure_channel(store.address) as channel:
        yield pb_grpc.LiveStub(channel)


def live_manifest(tmp_path: Path, rid: str | None = None, ended: bool = False) -> pb.Manifest:
    keys = make_keys(tmp_path / "keys")
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    meta = CaptureMeta(
        recording_id=rid or uuid.uuid4().hex,
        site="hel-1",
        source="siprec",
        call_ref="ref-" + uuid.uuid4().hex[:8],
        direction=Direction.INBOUND,
        started_at=iso_ms(started),
        ended_at=iso_ms(started + dt.timedelta(seconds=6)),
        service_number="+3581005577",
        customer=keys.protector().protect("+358401234567"),
        employees=(),
        legs=(CUSTOMER_LEG, EMPLOYEE_LEG),
    )
    manifest = manifest_from_capture(meta, "opus", 2, 0, "", "fi")
    for name in ("size", "sha256") + (() if ended else ("ended_at",)):
        manifest.ClearField(name)
    return manifest


def append(
    stub: pb_grpc.LiveStub, manifest: pb.Manifest, *pieces: tuple[str, int, bytes]
) -> dict[str, int]:
    request = pb.LiveAppendRequest(recording_id=manifest.recording_id, manifest=manifest)
    for leg, offset, data in pieces:
        request.legs.append(pb.LegBytes(leg=leg, offset=offset, data=data))
    state = stub.Append(request, timeout=10)
    return {s.leg: s.size for s in state.legs}


def finish(
    stub: pb_grpc.LiveStub, manifest: pb.Manifest, customer: bytes, employee: bytes
) -> pb.LiveState:
    final = pb.Manifest()
    final.CopyFrom(manifest)
    final.ended_at.FromDatetime(manifest.started_at.ToDatetime(dt.UTC) + dt.timedelta(seconds=6))
    legs = [
        pb.LegFinal(leg=leg, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        for leg, data in (("customer", customer), ("employee", employee))
    ]
    return stub.Finish(pb.LiveFinishRequest(manifest=final, legs=legs), timeout=30)


def wait_stored(store: InProcessStore, rid: str, timeout: float = 30.0) -> RecordingRow:
    catalog = Catalog(store.config.catalog_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = catalog.get(rid)
            if row is not None:
                return row
            time.sleep(0.1)
    finally:
        catalog.close()
    raise AssertionError(f"recording {rid} not archived in {timeout} s")


def archive_audio(store: InProcessStore, row: RecordingRow, target: Path) -> Path:
    storage = open_storage(store.config)
    try:
        target.write_bytes(b"".join(storage.vault.read(row.recording_id, row.blob_key)))
    finally:
        storage.catalog.close()
    return target


def pcm_of_leg(store: InProcessStore, rid: str, leg: str) -> bytes:
    """The leg as the store holds it while the call runs (decrypted segments)."""
    from agent.store.live.segments import LiveStore

    storage = open_storage(store.config)
    try:
        live = LiveStore(storage.catalog, storage.vault, store.config.incoming_dir)
        row = live.get(rid)
        assert row is not None
        return b"".join(live.read_leg(row, leg))
    finally:
        storage.catalog.close()


def test_appends_resume_without_duplicates_and_the_archive_has_the_call(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(6, 440), tone(6, 660)

    assert append(
        stub, manifest, ("customer", 0, customer[:SECOND]), ("employee", 0, employee[:SECOND])
    ) == {
        "customer": SECOND,
        "employee": SECOND,
    }
    # A retried append (its answer lost) and one that overlaps: nothing twice.
    assert append(stub, manifest, ("customer", 0, customer[:SECOND])) == {
        "customer": SECOND,
        "employee": SECOND,
    }
    sizes = append(stub, manifest, ("customer", SECOND // 2, customer[SECOND // 2 : 3 * SECOND]))
    assert sizes["customer"] == 3 * SECOND
    # A gap is refused: the agent must resume from the store's size.
    with pytest.raises(grpc.RpcError) as gap:
        append(stub, manifest, ("employee", 2 * SECOND, employee[2 * SECOND : 3 * SECOND]))
    assert gap.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "holds 16000 bytes" in (gap.value.details() or "")

    state = stub.Query(pb.LiveQueryRequest(recording_id=rid), timeout=5)
    assert state.known and not state.finished
    assert {s.leg: s.size for s in state.legs} == {"customer": 3 * SECOND, "employee": SECOND}
    # Durable and readable while the call goes on; encrypted at rest (no plaintext).
    assert pcm_of_leg(store, rid, "customer") == customer[: 3 * SECOND]
    blobs = list((store.config.blobs_dir).rglob(f"live-{rid}-*"))
    assert blobs and all(customer[:64] not in p.read_bytes() for p in blobs)

    append(
        stub,
        manifest,
        ("customer", 3 * SECOND, customer[3 * SECOND :]),
        ("employee", SECOND, employee[SECOND:]),
    )
    done = finish(stub, manifest, customer, employee)
    assert done.finished
    assert finish(stub, manifest, customer, employee).finished  # a repeated finish: same answer

    row = wait_stored(store, rid)
    assert row.channels == 2 and row.audio_format == "opus" and row.source == "siprec"
    assert row.customer_masked == "+358401234***" and row.flags == ""
    channels, rate, seconds = probe(archive_audio(store, row, tmp_path / "a.ogg"))
    assert channels == 2 and abs(seconds - 6.0) < 0.1, (channels, rate, seconds)
    # The segments are gone once the archive is stored.
    catalog = Catalog(store.config.catalog_url)
    with catalog.engine.connect() as conn:
        assert conn.execute(live_segments.select()).first() is None
        states = [r.state for r in conn.execute(live_recordings.select())]
    assert states == ["archived"]  # kept a day, to answer a late finish
    catalog.close()
    assert not list(store.config.blobs_dir.rglob(f"live-{rid}-*"))


def test_finish_with_other_bytes_discards_the_audio_and_asks_again(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    customer, employee = tone(2, 440), tone(2, 660)
    append(stub, manifest, ("customer", 0, customer), ("employee", 0, employee))
    wrong = bytearray(customer)
    wrong[1000] ^= 0xFF
    with pytest.raises(grpc.RpcError) as refused:
        finish(stub, manifest, bytes(wrong), employee)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    with pytest.raises(grpc.RpcError) as short:
        finish(stub, manifest, customer, employee)
    assert short.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # it must come again
    sizes = {
        s.leg: s.size
        for s in stub.Query(pb.LiveQueryRequest(recording_id=manifest.recording_id)).legs
    }
    assert sizes == {"customer": 0, "employee": 0}
    assert append(stub, manifest, ("customer", 0, customer), ("employee", 0, employee)) == {
        "customer": len(customer),
        "employee": len(employee),
    }
    assert finish(stub, manifest, customer, employee).finished


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        (
            lambda r: r.legs.append(pb.LegBytes(leg="mixed", offset=0, data=b"\0\0")),
            "INVALID_ARGUMENT",
            "expected one of",
        ),
        (
            lambda r: r.legs.append(pb.LegBytes(leg="customer", offset=0, data=b"\0" * 300_000)),
            "INVALID_ARGUMENT",
            "bytes of 16-bit",
        ),
        (
            lambda r: r.legs.append(pb.LegBytes(leg="customer", offset=0, data=b"\0")),
            "INVALID_ARGUMENT",
            "16-bit",
        ),
        (
            lambda r: setattr(r.manifest.customer, "masked", "+358401234567"),
            "INVALID_ARGUMENT",
            "customer.masked",
        ),
        (lambda r: r.ClearField("manifest"), "FAILED_PRECONDITION", "carries the manifest"),
        (lambda r: setattr(r.manifest, "region", "us-east-1"), "FAILED_PRECONDITION", "region"),
    ],
)
def test_bad_appends_are_refused_before_anything_is_written(
    store: InProcessStore,
    stub: pb_grpc.LiveStub,
    tmp_path: Path,
    change: object,
    code: str,
    words: str,
) -> None:
    manifest = live_manifest(tmp_path)
    request = pb.LiveAppendRequest(recording_id=manifest.recording_id, manifest=manifest)
    change(request)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as refused:
        stub.Append(request, timeout=10)
    assert refused.value.code().name == code and words in (refused.value.details() or "")
    assert "358401234567" not in store.config.data_dir.joinpath(
        "catalog.sqlite3"
    ).read_bytes().decode("latin-1")
    state = stub.Query(pb.LiveQueryRequest(recording_id=manifest.recording_id), timeout=5)
    assert not state.known


def test_a_call_whose_agent_vanished_is_finished_as_incomplete_with_its_audio(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    customer, employee = tone(3, 440), tone(2.5, 660)
    append(stub, manifest, ("customer", 0, customer), ("employee", 0, employee))
    row = wait_stored(store, manifest.recording_id, timeout=20)  # live_timeout = 2 s
    assert "incomplete" in row.flags.split(",")
    assert abs(row.duration_ms - 3000) <= 5
    channels, _, seconds = probe(archive_audio(store, row, tmp_path / "a.ogg"))
    assert channels == 2 and abs(seconds - 3.0) < 0.1
    # The agent, back with a longer copy, is told to append the rest first (the tail:
    # tests/test_live_tail.py); nothing of the audio changed meanwhile.
    with pytest.raises(grpc.RpcError) as late:
        finish(stub, manifest, customer + tone(1, 440), employee)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "append the rest first" in (late.value.details() or "")
    assert stub.Query(pb.LiveQueryRequest(recording_id=manifest.recording_id)).legs[0].size == len(
        customer
    )


def test_decoded_archive_keeps_customer_left_and_employee_right(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    customer, employee = tone(2, 440), bytes(2 * SECOND)  # the employee is silent
    append(stub, manifest, ("customer", 0, customer), ("employee", 0, employee))
    finish(stub, manifest, customer, employee)
    row = wait_stored(store, manifest.recording_id)
    assert row.flags == "silent_employee"
    audio = archive_audio(store, row, tmp_path / "a.ogg")
    raw = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(audio),
            "-f",
            "s16le",
            "-ac",
            "2",
            "-ar",
            str(RATE),
            "-",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    left = [abs(struct.unpack_from("<h", raw, i)[0]) for i in range(0, len(raw), 4)]
    right = [abs(struct.unpack_from("<h", raw, i)[0]) for i in range(2, len(raw), 4)]
    assert sum(left) / len(left) > 1000 and sum(right) / len(right) < 50


def test_a_discarded_live_call_leaves_nothing_at_the_store(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    """What the recording control's "discard" calls (issue 21): found by recording id."""
    from agent.store.live import archive_queue
    from agent.store.live.segments import LiveStore

    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    for second in range(3):
        offset = second * SECOND
        append(
            stub, manifest, ("customer", offset, tone(1, 440)), ("employee", offset, tone(1, 660))
        )
    assert list(store.config.blobs_dir.rglob(f"live-{rid}-*"))
    storage = open_storage(store.config)
    try:
        live = LiveStore(storage.catalog, storage.vault, tmp_path / "w")
        assert archive_queue.destroy(live, rid) == 3
        with storage.catalog.engine.connect() as conn:
            assert conn.execute(live_segments.select()).first() is None
            assert conn.execute(live_recordings.select()).first() is None
    finally:
        storage.catalog.close()
    assert not list(store.config.blobs_dir.rglob(f"live-{rid}-*"))
    assert not stub.Query(pb.LiveQueryRequest(recording_id=rid), timeout=5).known


def test_over_mutual_tls_a_call_is_only_touched_by_the_site_that_started_it(
    tmp_path: Path,
) -> None:
    from tests.support.pki import SITE, make_pki

    pki = make_pki(tmp_path / "pki")
    pki.add_agent("tku-1")
    with InProcessStore(store_config(tmp_path, tls=pki.store_tls)) as tls_store:

        def stub(stem: str) -> pb_grpc.LiveStub:
            return pb_grpc.LiveStub(grpc.secure_channel(tls_store.address, pki.credentials(stem)))

        ours, theirs = stub(f"agent-{SITE}"), stub("agent-tku-1")
        manifest = live_manifest(tmp_path)
        assert manifest.site == SITE
        assert append(ours, manifest, ("customer", 0, tone(1, 440)))["customer"] == SECOND
        for call in (
            lambda: append(theirs, manifest, ("customer", SECOND, tone(1, 440))),
            lambda: theirs.Query(
                pb.LiveQueryRequest(recording_id=manifest.recording_id), timeout=5
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        other = live_manifest(tmp_path)  # a manifest naming hel-1, from tku-1's certificate
        with pytest.raises(grpc.RpcError) as forged:
            append(theirs, other, ("customer", 0, tone(1, 440)))
        assert forged.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not ours.Query(pb.LiveQueryRequest(recording_id=other.recording_id), timeout=5).known


def test_a_plain_call_with_one_mixed_leg_is_archived_mono(
    store: InProcessStore, stub: pb_grpc.LiveStub, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    manifest.channels = 1
    mixed = tone(2, 440)
    with pytest.raises(grpc.RpcError) as wrong_leg:
        append(stub, manifest, ("customer", 0, mixed))
    assert wrong_leg.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    append(stub, manifest, ("mixed", 0, mixed))
    final = pb.Manifest()
    final.CopyFrom(manifest)
    final.ended_at.FromDatetime(manifest.started_at.ToDatetime(dt.UTC) + dt.timedelta(seconds=2))
    leg = pb.LegFinal(leg="mixed", size=len(mixed), sha256=hashlib.sha256(mixed).hexdigest())
    assert stub.Finish(pb.LiveFinishRequest(manifest=final, legs=[leg]), timeout=30).finished
    row = wait_stored(store, manifest.recording_id)
    channels, _, seconds = probe(archive_audio(store, row, tmp_path / "m.ogg"))
    assert row.channels == 1 and channels == 1 and abs(seconds - 2.0) < 0.1
