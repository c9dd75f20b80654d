"""Live upload across store replicas: two stores on one PostgreSQL and one S3 bucket
(SeaweedFS), sharing one master key file. A call's appends land on either; each
continues from the durable sizes the other wrote (nothing of a live call sits on a
replica's own disk), the finish on the second checks bytes the first received, one
archiver encodes it once, and no segment is left in the bucket. A call one replica
timed out takes its tail through the other."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.archive.vault import open_storage
from tests.support.audio import probe
from tests.support.services import make_backend, postgres, seaweed  # noqa: F401 (fixtures)
from tests.support.stack import InProcessStore
from tests.test_live_store import SECOND, append, finish, live_manifest, tone
from tests.test_live_tail import _wait_replaced

pytestmark = pytest.mark.slow


@contextmanager
def two_replicas(
    request: pytest.FixtureRequest, tmp_path: Path, live_timeout_s: float
) -> Iterator[tuple[InProcessStore, InProcessStore]]:
    distributed = make_backend("postgresql+s3", tmp_path, request)
    key = {"master_key_file": str(tmp_path / "keys" / "master.key")}
    configs = [
        dataclasses.replace(
            distributed.config(data_dir=str(tmp_path / f"replica-{i}"), keys=key),
            live_timeout_s=live_timeout_s,
        )
        for i in (1, 2)
    ]
    with InProcessStore(configs[0]) as first, InProcessStore(configs[1]) as second:
        yield first, second


@pytest.fixture
def replicas(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[InProcessStore, InProcessStore]]:
    with two_replicas(request, tmp_path, 600.0) as both:
        yield both


def test_a_call_streamed_to_two_replicas_is_stored_once_and_whole(
    replicas: tuple[InProcessStore, InProcessStore], tmp_path: Path
) -> None:
    first, second = replicas
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(3, 440), tone(3, 660)
    with grpc.insecure_channel(first.address) as a, grpc.insecure_channel(second.address) as b:
        one, two = pb_grpc.LiveStub(a), pb_grpc.LiveStub(b)
        append(
            one, manifest, ("customer", 0, customer[:SECOND]), ("employee", 0, employee[:SECOND])
        )
        # The second replica resumes from what the first made durable.
        state = two.Query(pb.LiveQueryRequest(recording_id=rid), timeout=10)
        assert {s.leg: s.size for s in state.legs} == {"customer": SECOND, "employee": SECOND}
        append(
            two,
            manifest,
            ("customer", 0, customer[: 2 * SECOND]),
            ("employee", SECOND, employee[SECOND:]),
        )
        append(one, manifest, ("customer", 2 * SECOND, customer[2 * SECOND :]))
        assert finish(two, manifest, customer, employee).finished
        assert finish(one, manifest, customer, employee).finished  # the same answer anywhere

    storage = open_storage(first.config)
    try:
        row = None
        for _ in range(300):
            if (row := storage.catalog.get(rid)) is not None:
                break
            time.sleep(0.1)
        assert row is not None, "not archived"
        audio = tmp_path / "a.ogg"
        audio.write_bytes(b"".join(storage.vault.read(rid, row.blob_key)))
        channels, _, seconds = probe(audio)
        assert channels == 2 and abs(seconds - 3.0) < 0.1
        assert len([r for r in storage.catalog.list(limit=100) if r.recording_id == rid]) == 1
        for _ in range(100):
            if not [k for k in list(storage.blobs.keys()) if k.startswith(f"live-{rid}")]:
                break
            time.sleep(0.1)
        assert not [k for k in list(storage.blobs.keys()) if k.startswith(f"live-{rid}")]
    finally:
        storage.catalog.close()


def test_a_call_timed_out_is_completed_through_the_other_replica(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(3, 440), tone(3, 660)
    with (
        two_replicas(request, tmp_path, 2.0) as (first, second),
        grpc.insecure_channel(first.address) as a,
        grpc.insecure_channel(second.address) as b,
    ):
        one, two = pb_grpc.LiveStub(a), pb_grpc.LiveStub(b)
        append(
            one, manifest, ("customer", 0, customer[:SECOND]), ("employee", 0, employee[:SECOND])
        )
        storage = open_storage(first.config)
        try:
            deadline = time.monotonic() + 30
            while (stored := storage.catalog.get(rid)) is None:
                assert time.monotonic() < deadline, "not timed out and archived"
                time.sleep(0.1)
            assert "incomplete" in stored.flags
            # The agent comes back through the other replica, which reopens the call.
            state = two.Query(pb.LiveQueryRequest(recording_id=rid), timeout=10)
            assert not state.finished
            assert {s.leg: s.size for s in state.legs} == {"customer": SECOND, "employee": SECOND}
            append(
                two,
                manifest,
                ("customer", SECOND, customer[SECOND:]),
                ("employee", SECOND, employee[SECOND:]),
            )
            assert finish(one, manifest, customer, employee).finished
            row = _wait_replaced(first, rid, stored.blob_key)
            assert row.flags == ""
            audio = tmp_path / "a.ogg"
            audio.write_bytes(b"".join(storage.vault.read(rid, row.blob_key)))
            assert abs(probe(audio)[2] - 3.0) < 0.1
            assert [r.recording_id for r in storage.catalog.list(limit=100)] == [rid]
            assert not [k for k in list(storage.blobs.keys()) if k.startswith(stored.blob_key)]
        finally:
            storage.catalog.close()
