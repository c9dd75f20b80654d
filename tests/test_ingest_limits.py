"""What one agent certificate can hold open in the real store (mutual TLS, site from the
certificate): a cap on concurrent uploads and on bytes of partial uploads per site
(RESOURCE_EXHAUSTED while another site still uploads), an idle deadline per stream,
partial uploads removed by their age since they began and encrypted at rest."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.config import store_config_from_dict
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.archive.vault import open_storage
from agent.store.ingest import partials
from agent.store.retention.sweeper import Sweeper
from tests.support.faults import ingest_stub, manifest_for
from tests.support.pki import Pki, make_pki
from tests.support.stack import InProcessStore

OTHER_SITE = "tku-2"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = make_pki(tmp_path / "pki")
    pki.add_agent(OTHER_SITE)
    return pki


def limited_store(tmp_path: Path, pki: Pki, **limits: object) -> InProcessStore:
    doc = {"store": {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "store-data"),
                     "tls": pki.store_tls, **limits}}  # fmt: skip
    return InProcessStore(store_config_from_dict(doc, tmp_path))


def upload(stub: pb_grpc.IngestStub, data: bytes, site: str) -> pb.UploadReceipt:
    manifest = manifest_for(data, site)
    requests = [
        pb.UploadRequest(manifest=manifest),
        pb.UploadRequest(chunk=pb.Chunk(offset=0, data=data)),
        pb.UploadRequest(finish=pb.Finish(size=manifest.size, sha256=manifest.sha256)),
    ]
    receipt: pb.UploadReceipt = stub.Upload(iter(requests), timeout=20)
    return receipt


class HangingUpload:
    """An upload that sends its manifest and a first chunk, then nothing until released."""

    def __init__(self, stub: pb_grpc.IngestStub, data: bytes, site: str) -> None:
        self.manifest = manifest_for(data, site)
        self.release = threading.Event()
        self.data = data
        self.future = stub.Upload.future(self._requests(), timeout=60)

    def _requests(self) -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(manifest=self.manifest)
        yield pb.UploadRequest(chunk=pb.Chunk(offset=0, data=self.data[:1000]))
        self.release.wait(60)

    def stop(self) -> None:
        self.release.set()
        self.future.cancel()  # type: ignore[no-untyped-call]


def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_site_at_its_upload_cap_is_refused_while_another_site_uploads(
    tmp_path: Path, pki: Pki
) -> None:
    with limited_store(tmp_path, pki, max_uploads_per_site=3) as store:
        ingest = store.server.ingest
        assert ingest is not None
        hel = ingest_stub(store, pki)
        hanging = [HangingUpload(hel, os.urandom(5000), "hel-1") for _ in range(3)]
        try:
            wait_until(lambda: ingest.limits.active("hel-1") == 3)
            with pytest.raises(grpc.RpcError) as err:
                upload(hel, os.urandom(5000), "hel-1")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 uploads in progress" in (err.value.details() or "")
            data = os.urandom(5000)
            receipt = upload(ingest_stub(store, pki, f"agent-{OTHER_SITE}"), data, OTHER_SITE)
            assert receipt.sha256 == hashlib.sha256(data).hexdigest()
        finally:
            for h in hanging:
                h.stop()
        wait_until(lambda: ingest.limits.active("hel-1") == 0)
        upload(hel, os.urandom(5000), "hel-1")  # the slots are free again


def test_a_site_at_its_byte_cap_is_refused(tmp_path: Path, pki: Pki) -> None:
    with limited_store(tmp_path, pki, max_incoming_per_site=300_000) as store:
        ingest = store.server.ingest
        assert ingest is not None
        hel = ingest_stub(store, pki)
        big = HangingUpload(hel, os.urandom(200_000), "hel-1")
        try:
            wait_until(lambda: ingest.limits.active("hel-1") == 1)
            with pytest.raises(grpc.RpcError) as err:
                upload(hel, os.urandom(150_000), "hel-1")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "bytes of unfinished uploads" in (err.value.details() or "")
            upload(ingest_stub(store, pki, f"agent-{OTHER_SITE}"), os.urandom(150_000), OTHER_SITE)
            upload(hel, os.urandom(50_000), "hel-1")  # what fits still goes
        finally:
            big.stop()


def test_an_idle_stream_is_closed_and_its_bytes_kept(tmp_path: Path, pki: Pki) -> None:
    with limited_store(tmp_path, pki, upload_idle_timeout="1s") as store:
        hel = ingest_stub(store, pki)
        idle = HangingUpload(hel, os.urandom(5000), "hel-1")
        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as err:
                idle.future.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 10
        finally:
            idle.stop()
        query = pb.QueryUploadRequest(recording_id=idle.manifest.recording_id)
        assert hel.QueryUpload(query, timeout=10).committed_size == 1000


def test_partial_uploads_are_removed_by_age_since_they_began(tmp_path: Path, pki: Pki) -> None:
    with limited_store(tmp_path, pki, upload_idle_timeout="1s", part_max_age="2h") as store:
        hel = ingest_stub(store, pki)
        uploads = [HangingUpload(hel, os.urandom(5000), "hel-1") for _ in range(2)]
        for hanging in uploads:
            with pytest.raises(grpc.RpcError):
                hanging.future.result(timeout=30)
            hanging.stop()
        old, fresh = (u.manifest.recording_id for u in uploads)
        incoming = store.config.incoming_dir
        begun = time.time() - 3 * 3600  # began 3 h ago, grew a moment ago
        os.utime(incoming / f"{old}.manifest", (begun, begun))
        storage = open_storage(store.config)
        try:
            report = Sweeper.from_config(store.config, storage.catalog, storage.vault).run_once()
        finally:
            storage.catalog.close()
        assert report.partial_uploads == 1
        assert not (incoming / f"{old}.part").exists()
        assert partials.scan(incoming / f"{fresh}.part").plain == 1000


def test_a_blob_store_failure_is_unavailable_with_a_generic_message(
    tmp_path: Path, pki: Pki
) -> None:
    """The blob store fails at finish (here: a file where a blob directory must go): the
    agent gets UNAVAILABLE (it retries), never UNKNOWN with the exception's text."""
    with limited_store(tmp_path, pki) as store:
        data = os.urandom(5000)
        manifest = manifest_for(data, "hel-1")
        blocker = store.config.blobs_dir / manifest.recording_id[:2]
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a directory")
        requests = [
            pb.UploadRequest(manifest=manifest),
            pb.UploadRequest(chunk=pb.Chunk(offset=0, data=data)),
            pb.UploadRequest(finish=pb.Finish(size=len(data), sha256=manifest.sha256)),
        ]
        hel = ingest_stub(store, pki)
        with pytest.raises(grpc.RpcError) as err:
            hel.Upload(iter(requests), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        details = err.value.details() or ""
        assert "ref=" in details and str(blocker) not in details and "Errno" not in details
        blocker.unlink()  # the agent's retry resumes from the bytes kept: finish only
        query = pb.QueryUploadRequest(recording_id=manifest.recording_id)
        assert hel.QueryUpload(query, timeout=10).committed_size == len(data)
        retry = [requests[0], requests[2]]
        assert hel.Upload(iter(retry), timeout=20).sha256 == manifest.sha256


def test_a_partial_upload_is_encrypted_at_rest_and_resumes(tmp_path: Path, pki: Pki) -> None:
    audio = b"RIFF" + b"customer said hello " * 2000  # plaintext that is easy to spot
    with limited_store(tmp_path, pki, upload_idle_timeout="1s") as store:
        hel = ingest_stub(store, pki)
        manifest = manifest_for(audio, "hel-1")
        first = [pb.UploadRequest(manifest=manifest)] + [
            pb.UploadRequest(chunk=pb.Chunk(offset=o, data=audio[o : o + 7000]))
            for o in range(0, 21_000, 7000)
        ]
        with pytest.raises(grpc.RpcError):  # the stream ends without its finish
            hel.Upload(iter(first), timeout=20)
        part = store.config.incoming_dir / f"{manifest.recording_id}.part"
        on_disk = part.read_bytes()
        assert b"customer said hello" not in on_disk and len(on_disk) > 21_000
        with part.open("ab") as fh:  # a record torn by a crash of the host
            fh.write(b"\x00\x00\x10")
        query = pb.QueryUploadRequest(recording_id=manifest.recording_id)
        committed = hel.QueryUpload(query, timeout=10).committed_size
        assert committed == 21_000
        rest = [pb.UploadRequest(manifest=manifest)] + [
            pb.UploadRequest(chunk=pb.Chunk(offset=o, data=audio[o : o + 7000]))
            for o in range(committed, len(audio), 7000)
        ]
        rest.append(pb.UploadRequest(finish=pb.Finish(size=len(audio), sha256=manifest.sha256)))
        receipt = hel.Upload(iter(rest), timeout=20)
        assert receipt.sha256 == hashlib.sha256(audio).hexdigest()
        assert list(store.config.incoming_dir.iterdir()) == []
        storage = open_storage(store.config)
        try:
            row = storage.catalog.get(manifest.recording_id)
            assert row is not None
            assert b"".join(storage.vault.read(row.recording_id, row.blob_key)) == audio
        finally:
            storage.catalog.close()
