"""Partial uploads: the resumable state of an upload between streams.

Kept on the receiving store's disk, in ``incoming/``: ``<id>.manifest`` (the upload's
manifest, written once when the upload begins: its mtime is the upload's age), beside
``<id>.key`` (the upload's own AES-256 key, wrapped by the master key like a
recording's data key) and ``<id>.part``, the bytes received so far, encrypted at rest
(fsynced every few MB and when a stream ends without its finish). The part is a run of
records, one per received chunk::

    record i = plaintext length (u32, big-endian) |
               AES-GCM(part key, nonce = prefix (4 bytes, in <id>.key) | i (u64),
                       chunk, aad = "callrec-part-v1" | recording id | i (u64))

so the committed size is the sum of the complete records' lengths (read from their
headers, no key needed), a record torn by a crash is cut off before the next append,
and the finish decrypts the records as it re-encrypts the audio into the vault.

The functions below are the whole interface the Ingest service uses — the committed
size for QueryUpload, the size an upload of the same recording can resume from,
opening, appending, closing, reading back, discarding — so that a later change can keep this state
where every store replica sees it (issue 18: S3 multipart parts listed on resume, or
the catalog) by providing the same operations. The sweeper removes partial uploads by
age (``sweeper.remove_stale_uploads``); the per-site bounds are ``upload_limits``.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from agent.capture import fsync_dir
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.archive.crypto import TAG_BYTES, CryptoError, new_data_key
from agent.store.keys.master import KeyWrapper

_LENGTH = struct.Struct(">I")
_AAD = b"callrec-part-v1\x00"


def key_file_of(part: Path) -> Path:
    return part.with_suffix(".key")


@dataclass(frozen=True)
class Scan:
    plain: int  # bytes of audio in complete records
    complete: int  # bytes of the file they take
    records: int


def scan(part: Path) -> Scan:
    """The part's complete records (a torn last record is not counted)."""
    plain = complete = records = 0
    try:
        with part.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            while complete + _LENGTH.size <= size:
                fh.seek(complete)
                (length,) = _LENGTH.unpack(fh.read(_LENGTH.size))
                end = complete + _LENGTH.size + length + TAG_BYTES
                if end > size:
                    break
                plain, complete, records = plain + length, end, records + 1
    except FileNotFoundError:
        pass
    return Scan(plain, complete, records)


def same_upload(manifest: pb.Manifest, manifest_file: Path) -> bool:
    try:
        previous = pb.Manifest.FromString(manifest_file.read_bytes())
    except (FileNotFoundError, DecodeError):
        return False
    return (previous.sha256, previous.size, previous.site) == (
        manifest.sha256,
        manifest.size,
        manifest.site,
    )


def resumable_size(manifest: pb.Manifest, part: Path, manifest_file: Path) -> int:
    """Bytes of an earlier stream of the same recording we can build on (else 0)."""
    if not same_upload(manifest, manifest_file) or not key_file_of(part).exists():
        return 0
    return min(scan(part).plain, manifest.size)


def committed_size(part: Path, manifest_file: Path, site: str | None) -> int:
    """QueryUpload's committed size; another site's partial upload counts as nothing."""
    if site is not None:
        try:
            if pb.Manifest.FromString(manifest_file.read_bytes()).site != site:
                return 0
        except (FileNotFoundError, DecodeError):
            return 0
    return scan(part).plain


@dataclass
class PartWriter:
    fd: int
    aead: AESGCM
    prefix: bytes
    aad: bytes
    index: int

    def seal(self, data: bytes) -> bytes:
        nonce = self.prefix + self.index.to_bytes(8, "big")
        sealed = self.aead.encrypt(nonce, data, self.aad + self.index.to_bytes(8, "big"))
        self.index += 1
        return _LENGTH.pack(len(data)) + sealed


def _context(recording_id: str) -> bytes:
    return f"{recording_id}/part".encode()


def _write_key(key_file: Path, recording_id: str, wrapper: KeyWrapper) -> tuple[bytes, bytes]:
    key, prefix = new_data_key(), os.urandom(4)
    key_id, wrapped = wrapper.wrap(key, _context(recording_id))
    doc = {"key_id": key_id, "wrapped": base64.b64encode(wrapped).decode(), "prefix": prefix.hex()}
    _write_durably(key_file, json.dumps(doc).encode())
    return key, prefix


def _read_key(key_file: Path, recording_id: str, wrapper: KeyWrapper) -> tuple[bytes, bytes]:
    try:
        doc = json.loads(key_file.read_bytes())
        wrapped = base64.b64decode(doc["wrapped"])
        prefix = bytes.fromhex(doc["prefix"])
    except (OSError, ValueError, KeyError) as exc:
        raise CryptoError(recording_id, f"partial upload's key unreadable ({exc})") from None
    return wrapper.unwrap(doc["key_id"], wrapped, _context(recording_id)), prefix


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data, sync=True)
    finally:
        os.close(fd)
    tmp.replace(path)


def open_part(
    manifest: pb.Manifest, part: Path, manifest_file: Path, committed: int, wrapper: KeyWrapper
) -> PartWriter:
    """Open ``<id>.part`` for appending at ``committed``; a new upload (committed 0)
    first writes its manifest and key durably and starts the part empty. A record torn
    by a crash is cut off first."""
    rid = manifest.recording_id
    key_file = key_file_of(part)
    if committed == 0:
        _write_durably(manifest_file, manifest.SerializeToString(deterministic=True))
        key, prefix = _write_key(key_file, rid, wrapper)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        fsync_dir(part.parent)
        records = 0
    else:
        key, prefix = _read_key(key_file, rid, wrapper)
        found = scan(part)
        fd = os.open(part, os.O_WRONLY | os.O_APPEND)
        os.ftruncate(fd, found.complete)
        records = found.records
    return PartWriter(fd, AESGCM(key), prefix, _AAD + rid.encode() + b"\x00", records)


def append(writer: PartWriter, data: bytes, sync: bool) -> None:
    _write_all(writer.fd, writer.seal(data), sync)


def _write_all(fd: int, data: bytes, sync: bool) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if sync:
        os.fsync(fd)


def close_part(writer: PartWriter, sync: bool) -> None:
    """Close the part; a stream that ended without finish first makes what arrived
    durable, so the committed size QueryUpload reports survives a crash."""
    try:
        if sync:
            os.fsync(writer.fd)
    finally:
        os.close(writer.fd)


class PartReader:
    """The plaintext of a part, record by record (what the vault encrypts at finish)."""

    def __init__(self, part: Path, recording_id: str, wrapper: KeyWrapper) -> None:
        key, self._prefix = _read_key(key_file_of(part), recording_id, wrapper)
        self._aead = AESGCM(key)
        self._aad = _AAD + recording_id.encode() + b"\x00"
        self._rid = recording_id
        self._fh = part.open("rb")
        self._index = 0
        self._buffer = b""
        self.size = scan(part).plain

    def read(self, count: int = -1) -> bytes:
        while (count < 0 or len(self._buffer) < count) and (record := self._next()):
            self._buffer += record
        take = len(self._buffer) if count < 0 else count
        data, self._buffer = self._buffer[:take], self._buffer[take:]
        return data

    def _next(self) -> bytes:
        head = self._fh.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return b""
        (length,) = _LENGTH.unpack(head)
        sealed = self._fh.read(length + TAG_BYTES)
        if len(sealed) < length + TAG_BYTES:
            return b""
        index = self._index.to_bytes(8, "big")
        try:
            plain = self._aead.decrypt(self._prefix + index, sealed, self._aad + index)
        except InvalidTag:
            raise CryptoError(self._rid, f"partial upload record {self._index} fails") from None
        self._index += 1
        return plain

    def close(self) -> None:
        self._fh.close()


def plaintext_opener(
    part: Path, recording_id: str, wrapper: KeyWrapper
) -> Callable[[], PartReader]:
    return lambda: PartReader(part, recording_id, wrapper)


def discard(part: Path, manifest_file: Path) -> None:
    """Remove a partial upload (after its commit, or when its bytes are wrong)."""
    for path in (part, key_file_of(part), manifest_file):
        path.unlink(missing_ok=True)
