"""Encryption at rest: the chunk format, master keys and rotation, and the whole path
through a running store (upload → encrypted blob → export byte-identical), on SQLite +
files and on PostgreSQL + SeaweedFS."""

# Fixtures are imported from tests.support.services; test arguments name them.
# ruff: noqa: F811

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.manifest import timestamp
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import KeyFileError
from agent.store.archive.crypto import (
    HEADER_BYTES,
    TAG_BYTES,
    CryptoError,
    Header,
    decrypt_chunks,
    encrypt_stream,
    new_data_key,
    span,
)
from agent.store.archive.vault import KeyShredded, Storage, Vault, open_storage
from agent.store.catalog import Catalog, data_keys
from agent.store.keys.master import (
    FileKeyWrapper,
    KeyWrapError,
    add_master_key,
    create_master_key_file,
    open_master_keys,
    retire_master_key,
    rewrap_all,
)
from tests.support.services import Backend, backend, postgres, seaweed  # noqa: F401 (fixtures)
from tests.support.stack import InProcessStore

RID = "0123456789abcdef0123456789abcdef"


def seal(data: bytes, key: bytes, chunk: int = 1024, rid: str = RID) -> bytes:
    out = io.BytesIO()
    digest = encrypt_stream(key, rid, io.BytesIO(data), len(data), out, chunk)
    assert digest == hashlib.sha256(data).hexdigest()
    return out.getvalue()


def open_all(blob: bytes, key: bytes, rid: str = RID) -> bytes:
    header = Header.unpack(blob, rid)
    return b"".join(decrypt_chunks(key, rid, header, [blob[HEADER_BYTES:]]))


def open_range(blob: bytes, key: bytes, offset: int, length: int | None) -> bytes:
    header = Header.unpack(blob, RID)
    part = span(header, offset, length)
    if part.take == 0:
        return b""
    cipher = blob[part.cipher_offset : part.cipher_offset + part.cipher_length]
    plain = b"".join(decrypt_chunks(key, RID, header, [cipher], part.first_chunk, part.last_chunk))
    return plain[part.skip : part.skip + part.take]


# ---------------------------------------------------------------- the chunk format


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 3 * 1024 + 5])
def test_round_trip_and_sizes(size: int) -> None:
    key, data = new_data_key(), os.urandom(size)
    blob = seal(data, key)
    header = Header.unpack(blob, RID)
    assert len(blob) == header.ciphertext_size == HEADER_BYTES + size + header.chunks * TAG_BYTES
    assert open_all(blob, key) == data


@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 5000), offset=st.integers(0, 5200), length=st.integers(0, 5200))
def test_any_range_decrypts_from_its_own_chunks(size: int, offset: int, length: int) -> None:
    key = b"k" * 32
    data = bytes((i * 7) % 251 for i in range(size))
    blob = seal(data, key, chunk=257)
    assert open_range(blob, key, offset, length) == data[offset : offset + length]


def _chunks(blob: bytes, chunk: int = 1024) -> list[bytes]:
    body = blob[HEADER_BYTES:]
    step = chunk + TAG_BYTES
    return [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda h, c: h + b"".join(c[:-1]), "truncated"),  # final chunk dropped
        (lambda h, c: h + b"".join(c)[:-1], "truncated"),  # cut inside the final chunk
        (lambda h, c: h + c[1] + c[0] + b"".join(c[2:]), "fails authentication"),  # reordered
        (lambda h, c: h + b"".join(c) + b"x", "after the final chunk"),  # extended
        (lambda h, c: h + bytes([c[0][0] ^ 1]) + b"".join(c)[1:], "fails authentication"),
        (lambda h, c: h[:-1] + bytes([h[-1] - 1]) + b"".join(c), "fails authentication"),
    ],
    ids=["drop-final", "cut", "reorder", "extend", "flip-bit", "header-size"],
)
def test_tampering_is_detected(tamper: object, message: str) -> None:
    key = new_data_key()
    blob = seal(os.urandom(3 * 1024 + 100), key)
    bad = tamper(blob[:HEADER_BYTES], _chunks(blob))  # type: ignore[operator]
    with pytest.raises(CryptoError, match=message) as err:
        open_all(bad, key)
    assert RID in str(err.value), "errors name the recording"


def test_a_blob_only_opens_as_its_own_recording() -> None:
    key = new_data_key()
    blob = seal(b"hello" * 500, key)
    with pytest.raises(CryptoError, match="fails authentication"):
        open_all(blob, key, rid="f" * 32)


# ---------------------------------------------------------------- master keys


def test_master_key_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "master.key"
    create_master_key_file(path, "mk1")
    assert path.stat().st_mode & 0o777 == 0o600
    assert FileKeyWrapper.load(path).current_key_id == "mk1"
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        FileKeyWrapper.load(path)


def test_wrapped_key_is_bound_to_its_context(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    create_master_key_file(path, "mk1")
    wrapper = FileKeyWrapper.load(path)
    key = new_data_key()
    key_id, wrapped = wrapper.wrap(key, b"rid/blob")
    assert key_id == "mk1" and key not in wrapped
    assert wrapper.unwrap("mk1", wrapped, b"rid/blob") == key
    with pytest.raises(KeyWrapError):
        wrapper.unwrap("mk1", wrapped, b"other/blob")
    with pytest.raises(KeyWrapError, match="not in the key file"):
        wrapper.unwrap("mk0", wrapped, b"rid/blob")


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    opened = open_storage(backend.config())
    yield opened
    opened.catalog.close()


def _store(vault: Vault, tmp_path: Path, data: bytes) -> tuple[str, str]:
    rid = secrets.token_hex(16)
    source = tmp_path / f"{rid}.part"
    source.write_bytes(data)
    return rid, vault.store(rid, source, tmp_path, hashlib.sha256(data).hexdigest())


def test_master_key_rotation_rewraps_keys_without_touching_audio(
    storage: Storage, backend: Backend, tmp_path: Path
) -> None:
    cfg = backend.config()
    stored = {_store(storage.vault, tmp_path, os.urandom(5000)) for _ in range(3)}
    before = {bk: b"".join(storage.blobs.read(bk)) for _, bk in stored}
    plain = {bk: b"".join(storage.vault.read(rid, bk)) for rid, bk in stored}
    old_id = storage.vault.wrapper.current_key_id

    new_id = add_master_key(cfg.master_key_file, "mk-new")
    with pytest.raises(KeyFileError, match="still wraps 3"):
        retire_master_key(cfg.master_key_file, old_id, storage.catalog)
    wrapper = open_master_keys(cfg.master_key_file, storage.catalog)
    assert wrapper.current_key_id == new_id
    assert rewrap_all(storage.catalog, wrapper, batch=2) == 3
    assert rewrap_all(storage.catalog, wrapper) == 0, "idempotent"
    retire_master_key(cfg.master_key_file, old_id, storage.catalog)

    rotated = Vault(storage.catalog, storage.blobs, FileKeyWrapper.load(cfg.master_key_file))
    for rid, bk in stored:
        assert b"".join(storage.blobs.read(bk)) == before[bk], "audio not rewritten"
        assert b"".join(rotated.read(rid, bk)) == plain[bk]


def test_store_refuses_to_start_without_the_master_key(
    storage: Storage, backend: Backend, tmp_path: Path
) -> None:
    _store(storage.vault, tmp_path, b"x" * 100)
    path = backend.config().master_key_file
    path.rename(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError, match="master key file missing"):
        open_master_keys(path, storage.catalog)
    create_master_key_file(path, "mk-wrong")
    with pytest.raises(KeyFileError, match="not in file"):
        open_master_keys(path, storage.catalog)


# ---------------------------------------------------------------- the vault


def test_audio_is_encrypted_at_rest_and_reads_back_identical(
    storage: Storage, tmp_path: Path
) -> None:
    pattern = os.urandom(4096)
    data = pattern * 40 + b"tail"
    rid, blob_key = _store(storage.vault, tmp_path, data)
    raw = b"".join(storage.blobs.read(blob_key))
    assert raw != data and len(raw) > len(data)
    assert not any(data[i : i + 32] in raw for i in range(0, len(data) - 32, 29))
    assert b"".join(storage.vault.read(rid, blob_key)) == data
    assert b"".join(storage.vault.read(rid, blob_key, 70_000, 100_000)) == data[70_000:170_000]
    assert list(tmp_path.glob(".*.enc")) == [], "no plaintext or temporary copies left"


def test_a_shredded_key_makes_the_audio_unreadable(storage: Storage, tmp_path: Path) -> None:
    rid, blob_key = _store(storage.vault, tmp_path, b"secret" * 1000)
    storage.vault.shred(blob_key)
    with pytest.raises(KeyShredded, match=rid):
        b"".join(storage.vault.read(rid, blob_key))


def test_a_changed_source_is_not_stored(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "x.part"
    source.write_bytes(b"abc")
    with pytest.raises(CryptoError, match="changed"):
        storage.vault.store(RID, source, tmp_path, expected_sha256="0" * 64)
    assert list(storage.blobs.keys()) == []
    with storage.catalog.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(data_keys)).scalar() == 0


# ---------------------------------------------------------------- through the store


def _manifest(data: bytes, region: str = "fi") -> pb.Manifest:
    end = dt.datetime.now(dt.UTC)
    return pb.Manifest(
        recording_id=secrets.token_hex(16),
        site="hel-1",
        source="siprec",
        call_ref="c" * 16,
        direction=pb.DIRECTION_INBOUND,
        started_at=timestamp(end - dt.timedelta(seconds=30)),
        ended_at=timestamp(end),
        customer=pb.Customer(kind="anonymous", masked="anonymous"),
        employees=[pb.Employee(id="e1001", name="Aino Virtanen", aor="sip:1001@pbx.example")],
        audio_format="wav",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        channels=2,
        region=region,
    )


def _requests(manifest: pb.Manifest, data: bytes) -> Iterator[pb.UploadRequest]:
    yield pb.UploadRequest(manifest=manifest)
    for offset in range(0, len(data), 65536):
        chunk = pb.Chunk(offset=offset, data=data[offset : offset + 65536])
        yield pb.UploadRequest(chunk=chunk)
    yield pb.UploadRequest(finish=pb.Finish(size=len(data), sha256=manifest.sha256))


def test_uploaded_audio_exports_byte_identical_and_is_encrypted_at_rest(
    backend: Backend,
) -> None:
    data = os.urandom(150_000) + b"RIFF-like plaintext marker " * 100
    manifest = _manifest(data)
    with InProcessStore(backend.config()) as store:
        ingest = pb_grpc.IngestStub(grpc.insecure_channel(store.address))
        receipt = ingest.Upload(_requests(manifest, data), timeout=30)
        console = pb_grpc.ConsoleStub(grpc.insecure_channel(f"unix:{store.server.console_socket}"))
        request = pb.ExportAudioRequest(
            recording_id=manifest.recording_id, reason="test", purpose="verification"
        )
        exported = b"".join(c.data for c in console.ExportAudio(request, timeout=30))
    assert receipt.sha256 == manifest.sha256
    assert exported == data
    cat = Catalog(backend.config().catalog_url)
    row = cat.get(manifest.recording_id)
    assert row is not None and row.region == ("eu-north-1" if backend.distributed else "fi")
    storage = open_storage(backend.config())
    raw = b"".join(storage.blobs.read(row.blob_key))
    assert raw != data and b"plaintext marker" not in raw
    storage.catalog.close()
    cat.close()


def test_upload_from_outside_the_allowed_regions_is_refused_and_leaves_nothing(
    backend: Backend,
) -> None:
    data = os.urandom(10_000)
    manifest = _manifest(data, region="us")
    cfg = backend.config()
    with InProcessStore(cfg) as store:
        ingest = pb_grpc.IngestStub(grpc.insecure_channel(store.address))
        with pytest.raises(grpc.RpcError) as err:
            ingest.Upload(_requests(manifest, data), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "region" in (err.value.details() or "") and "'us'" in (err.value.details() or "")
        assert list(cfg.incoming_dir.iterdir()) == []
        storage = open_storage(cfg)
        assert storage.catalog.get(manifest.recording_id) is None
        assert list(storage.blobs.keys()) == []
        storage.catalog.close()
