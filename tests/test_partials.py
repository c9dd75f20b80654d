"""Partial uploads behind one interface (``agent/store/partials.py``): the same contract
on the receiving store's disk (SQLite + files) and in the shared bucket (PostgreSQL +
SeaweedFS, ``s3_partials``), and, on two replicas of one catalog and bucket, a cut
upload that resumes on the other replica from the durable offset."""

# Fixtures are imported from tests.support.services; test arguments name them.

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.config import store_config_from_dict
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.archive.vault import PARTIALS_PREFIX, Storage, open_partials, open_storage
from agent.store.ingest.partials import Partials
from agent.store.ingest.s3_partials import S3Partials
from tests.support.faults import ingest_stub, manifest_for
from tests.support.pki import Pki, make_pki
from tests.support.services import (
    Backend,
    SeaweedFS,
    backend,  # noqa: F401 (fixture)
    distributed,  # noqa: F401 (fixture)
    postgres,  # noqa: F401 (fixture)
    seaweed,  # noqa: F401 (fixture)
)
from tests.support.stack import InProcessStore
from tests.test_ingest_limits import wait_until

CHUNK = 64 * 1024
SPOT = b"customer said hello "  # plaintext that is easy to spot at rest


@pytest.fixture
def opened(backend: Backend) -> Iterator[tuple[Storage, Partials]]:  # noqa: F811 (fixture)
    config = backend.config()
    storage = open_storage(config)
    try:
        yield storage, open_partials(config, storage.vault)
    finally:
        storage.catalog.close()


def _write(partials: Partials, manifest: pb.Manifest, data: bytes, start: int, end: int) -> None:
    """One stream: chunks of ``data[start:end]``, then a cut (close keeping the bytes)."""
    sink = partials.open(manifest, start)
    for offset in range(start, end, CHUNK):
        sink.append(data[offset : min(offset + CHUNK, end)], sync=False)
    sink.close(sync=True)


def _read_all(partials: Partials, recording_id: str) -> bytes:
    source = partials.opener(recording_id, None)()
    try:
        return source.read()
    finally:
        source.close()


def test_a_cut_stream_resumes_from_its_durable_bytes(opened: tuple[Storage, Partials]) -> None:
    _, partials = opened
    data = SPOT * 20_000  # 400 kB
    manifest = manifest_for(data, "hel-1")
    rid = manifest.recording_id
    assert partials.committed_size(rid, "hel-1") == 0
    _write(partials, manifest, data, 0, 5 * CHUNK)
    assert partials.committed_size(rid, "hel-1") == 5 * CHUNK
    assert partials.committed_size(rid, None) == 5 * CHUNK
    assert partials.committed_size(rid, "tku-2") == 0, "another site's upload counts as nothing"
    assert partials.resumable_size(manifest) == 5 * CHUNK
    other = manifest_for(data[:-1], "hel-1")
    other.recording_id = rid
    assert partials.resumable_size(other) == 0, "other bytes under the same id start over"
    assert partials.holdings()[rid][0] == "hel-1"
    assert partials.holdings()[rid][1] >= 5 * CHUNK
    _write(partials, manifest, data, 5 * CHUNK, len(data))  # the resume
    assert partials.committed_size(rid, "hel-1") == len(data)
    assert _read_all(partials, rid) == data
    partials.discard(rid)
    assert partials.committed_size(rid, "hel-1") == 0
    assert rid not in partials.holdings()


def test_what_a_stream_holds_is_read_back_at_its_finish(opened: tuple[Storage, Partials]) -> None:
    """The finish reads the durable bytes and then what the stream still buffers."""
    _, partials = opened
    data = os.urandom(3 * CHUNK + 123)
    manifest = manifest_for(data, "hel-1")
    _write(partials, manifest, data, 0, CHUNK)
    sink = partials.open(manifest, CHUNK)
    sink.append(data[CHUNK:], sync=False)
    source = partials.opener(manifest.recording_id, sink)()
    try:
        assert source.size == len(data)
        assert b"".join(iter(lambda: source.read(10_000), b"")) == data
    finally:
        source.close()
        sink.close(sync=False)
    partials.discard(manifest.recording_id)


def _stored_bytes(storage: Storage, partials: Partials) -> list[bytes]:
    if isinstance(partials, S3Partials):
        client, bucket = partials.client, partials.bucket
        listed = client.list_objects_v2(Bucket=bucket, Prefix=PARTIALS_PREFIX)
        names = [item["Key"] for item in listed.get("Contents", [])]
        return [client.get_object(Bucket=bucket, Key=n)["Body"].read() for n in names]
    incoming: Path = partials.incoming  # type: ignore[attr-defined]
    return [p.read_bytes() for p in incoming.iterdir()]


def test_partial_uploads_are_encrypted_at_rest(opened: tuple[Storage, Partials]) -> None:
    storage, partials = opened
    data = SPOT * 20_000
    manifest = manifest_for(data, "hel-1")
    manifest.customer.masked = "+358401234***"
    manifest.employees.append(pb.Employee(id="e1001", name="Aino Virtanen"))
    _write(partials, manifest, data, 0, 4 * CHUNK)
    kept = _stored_bytes(storage, partials)
    assert sum(len(b) for b in kept) > 4 * CHUNK
    assert not any(SPOT[:12] in b for b in kept)
    if partials.shared:  # what leaves the store host holds no metadata of people either
        assert not any(b"+358401234" in b or b"Virtanen" in b for b in kept)
    partials.discard(manifest.recording_id)


def test_stale_partial_uploads_are_removed_by_age(opened: tuple[Storage, Partials]) -> None:
    _, partials = opened
    data = os.urandom(2 * CHUNK)
    manifest = manifest_for(data, "hel-1")
    _write(partials, manifest, data, 0, CHUNK)
    assert partials.remove_stale(grace_s=3600, max_age_s=3600) == 0
    assert partials.committed_size(manifest.recording_id, None) == CHUNK
    assert partials.remove_stale(grace_s=3600, max_age_s=0) == 1, "begun too long ago"
    assert partials.committed_size(manifest.recording_id, None) == 0
    _write(partials, manifest, data, 0, CHUNK)
    assert partials.remove_stale(grace_s=0, max_age_s=None) == 1, "untouched too long"
    assert partials.holdings() == {}


# ---------------------------------------------------------------- two replicas


def _replica_docs(distributed: Backend, tmp_path: Path, pki: Pki) -> list[dict[str, Any]]:  # noqa: F811
    shared = {**distributed.doc["store"], "keys": {"master_key_file": str(tmp_path / "master.key")},
              "tls": pki.store_tls}  # fmt: skip
    return [{**shared, "data_dir": str(tmp_path / f"data-{n}")} for n in "ab"]


def test_a_cut_upload_resumes_on_another_replica(
    distributed: Backend,  # noqa: F811 (fixture)
    seaweed: SeaweedFS,  # noqa: F811 (fixture)
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    docs = _replica_docs(distributed, tmp_path, pki)
    a_cfg, b_cfg = (store_config_from_dict({"store": d}, tmp_path) for d in docs)
    data = os.urandom(3 * 1024 * 1024 + 1000)
    manifest = manifest_for(data, "hel-1")
    cut_at = 10 * 256 * 1024  # 2.5 MiB: two windows written while streaming, half one held
    query = pb.QueryUploadRequest(recording_id=manifest.recording_id)
    with InProcessStore(a_cfg) as a, InProcessStore(b_cfg) as b:
        sent = threading.Event()

        def cut_stream() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(manifest=manifest)
            for offset in range(0, cut_at, 256 * 1024):
                yield pb.UploadRequest(
                    chunk=pb.Chunk(offset=offset, data=data[offset : offset + 256 * 1024])
                )
            sent.set()
            threading.Event().wait(30)  # the agent's link dies here  # fmt: skip

        on_a = ingest_stub(a, pki).Upload.future(cut_stream(), timeout=60)
        sent.wait(20)
        to_b = ingest_stub(b, pki)
        wait_until(lambda: to_b.QueryUpload(query, timeout=10).committed_size >= 2 * 1024 * 1024)
        on_a.cancel()  # type: ignore[no-untyped-call]
        wait_until(lambda: to_b.QueryUpload(query, timeout=10).committed_size == cut_at)
        # per-request balancing: the query answered by A, the upload taken by B
        committed = ingest_stub(a, pki).QueryUpload(query, timeout=10).committed_size
        rest = [pb.UploadRequest(manifest=manifest)] + [
            pb.UploadRequest(chunk=pb.Chunk(offset=o, data=data[o : o + 256 * 1024]))
            for o in range(committed, len(data), 256 * 1024)
        ]
        rest.append(pb.UploadRequest(finish=pb.Finish(size=len(data), sha256=manifest.sha256)))
        receipt = to_b.Upload(iter(rest), timeout=30)
        assert receipt.sha256 == hashlib.sha256(data).hexdigest()
        with pytest.raises(grpc.FutureCancelledError):
            on_a.result()
        assert ingest_stub(a, pki).QueryUpload(query, timeout=10).complete, "A sees B's receipt"
    storage = open_storage(a_cfg)
    try:
        row = storage.catalog.get(manifest.recording_id)
        assert (
            row is not None and b"".join(storage.vault.read(row.recording_id, row.blob_key)) == data
        )
        partials = open_partials(a_cfg, storage.vault)
        assert partials.holdings() == {}, "the partial upload went with its commit"
    finally:
        storage.catalog.close()


def test_a_partial_upload_that_does_not_open_is_discarded_and_sent_again(
    distributed: Backend,  # noqa: F811 (fixture)
    tmp_path: Path,
) -> None:
    """A segment that fails authentication (tampered, or sealed under another key by a
    racing replica): the finish answers DATA_LOSS, keeps nothing, the agent starts over."""
    pki = make_pki(tmp_path / "pki")
    doc = {**distributed.doc["store"], "tls": pki.store_tls}
    config = store_config_from_dict({"store": doc}, tmp_path)
    data = os.urandom(3 * CHUNK)
    manifest = manifest_for(data, "hel-1")
    query = pb.QueryUploadRequest(recording_id=manifest.recording_id)
    with InProcessStore(config) as store:
        ingest = store.server.ingest
        assert ingest is not None and isinstance(ingest.partials, S3Partials)
        partials = ingest.partials
        _write(partials, manifest, data, 0, 2 * CHUNK)
        name = f"{partials.prefix}{manifest.recording_id}/{0:016d}"
        sealed = partials.client.get_object(Bucket=partials.bucket, Key=name)["Body"].read()
        tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
        partials.client.put_object(Bucket=partials.bucket, Key=name, Body=tampered)
        to_store = ingest_stub(store, pki)
        assert to_store.QueryUpload(query, timeout=10).committed_size == 2 * CHUNK
        finish = pb.UploadRequest(finish=pb.Finish(size=len(data), sha256=manifest.sha256))
        rest = [pb.UploadRequest(manifest=manifest),
                pb.UploadRequest(chunk=pb.Chunk(offset=2 * CHUNK, data=data[2 * CHUNK :])),
                finish]  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            to_store.Upload(iter(rest), timeout=30)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert "send it again" in (err.value.details() or "")
        assert to_store.QueryUpload(query, timeout=10).committed_size == 0
        whole = [pb.UploadRequest(manifest=manifest),
                 *(pb.UploadRequest(chunk=pb.Chunk(offset=o, data=data[o : o + CHUNK]))
                   for o in range(0, len(data), CHUNK)),
                 finish]  # fmt: skip
        assert to_store.Upload(iter(whole), timeout=30).sha256 == manifest.sha256
        assert partials.holdings() == {}
