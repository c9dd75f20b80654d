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

``Partials`` is the whole interface the Ingest service (and the sweeper) use — the
committed size for QueryUpload, the size an upload of the same recording can resume
from, opening a sink, appending, closing, reading back, discarding, removing by age,
what each site holds. ``FilePartials`` keeps the state above in ``incoming/`` (one
store); ``s3_partials.S3Partials`` keeps it in the blob bucket, where every store
replica sees it (``vault.open_partials`` picks by the blob store). The sweeper removes
partial uploads by age (``remove_stale_uploads``, ``Partials.remove_stale``); the
per-site bounds are ``upload_limits``.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from agent import logs
from agent.capture import fsync_dir
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.archive.crypto import TAG_BYTES, CryptoError, new_data_key
from agent.store.keys.master import KeyWrapper

log = logs.get_logger(__name__)

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


# ---------------------------------------------------------------- the interface


class PartSink(Protocol):
    """One stream's appends to a partial upload (from its committed size on)."""

    def append(self, data: bytes, sync: bool) -> None:
        """Add ``data`` at the end; ``sync``: make everything so far durable now."""
        ...

    def close(self, sync: bool) -> None:
        """End the stream's writes; ``sync``: make what arrived durable first (a
        stream that ended without its finish), so a resume on any replica sees it."""
        ...


class Partials(Protocol):
    """Where partial uploads live between streams: the whole interface the Ingest
    service (and the sweeper) use. ``FilePartials``: the receiving store's own
    ``incoming/`` (one store); ``s3_partials.S3Partials``: the blob bucket, which every
    replica sees (a resume continues on any replica from the durable offset)."""

    @property
    def shared(self) -> bool:
        """Whether every store replica sees these partial uploads."""
        ...

    def committed_size(self, recording_id: str, site: str | None) -> int:
        """QueryUpload's committed size; another site's partial upload counts as 0."""
        ...

    def resumable_size(self, manifest: pb.Manifest) -> int:
        """Bytes of an earlier stream of the same upload to build on (else 0)."""
        ...

    def open(self, manifest: pb.Manifest, committed: int) -> PartSink:
        """Append from ``committed`` (0: a new upload, which replaces any other)."""
        ...

    def opener(self, recording_id: str, sink: PartSink | None) -> Callable[[], PlainSource]:
        """The whole plaintext received (durable bytes, then what ``sink`` holds)."""
        ...

    def discard(self, recording_id: str) -> None:
        """Remove a partial upload (after its commit, or when its bytes are wrong)."""
        ...

    def remove_stale(self, grace_s: float, max_age_s: float | None) -> int:
        """Remove partial uploads untouched for ``grace_s`` or begun more than
        ``max_age_s`` ago; returns how many. Safe on several replicas at once."""
        ...

    def holdings(self) -> dict[str, tuple[str, int]]:
        """``recording id → (site, bytes kept)`` of every partial upload."""
        ...

    def held_bytes(self, recording_id: str) -> int:
        """Bytes kept for one partial upload (0: none)."""
        ...


class PlainSource(Protocol):
    """What the vault encrypts: ``size`` bytes from ``read`` (``vault.PlainSource``)."""

    size: int

    def read(self, count: int = -1) -> bytes: ...

    def close(self) -> None: ...


class _FileSink:
    def __init__(self, writer: PartWriter) -> None:
        self.writer = writer

    def append(self, data: bytes, sync: bool) -> None:
        append(self.writer, data, sync)

    def close(self, sync: bool) -> None:
        close_part(self.writer, sync)


class FilePartials:
    """Partial uploads in the receiving store's ``incoming/`` (the functions above)."""

    def __init__(self, incoming: Path, wrapper: KeyWrapper) -> None:
        self.incoming = incoming
        self.wrapper = wrapper
        incoming.mkdir(parents=True, exist_ok=True)

    @property
    def shared(self) -> bool:
        return False

    def _paths(self, recording_id: str) -> tuple[Path, Path]:
        return self.incoming / f"{recording_id}.part", self.incoming / f"{recording_id}.manifest"

    def committed_size(self, recording_id: str, site: str | None) -> int:
        return committed_size(*self._paths(recording_id), site)

    def resumable_size(self, manifest: pb.Manifest) -> int:
        return resumable_size(manifest, *self._paths(manifest.recording_id))

    def open(self, manifest: pb.Manifest, committed: int) -> PartSink:
        part, manifest_file = self._paths(manifest.recording_id)
        return _FileSink(open_part(manifest, part, manifest_file, committed, self.wrapper))

    def opener(self, recording_id: str, sink: PartSink | None) -> Callable[[], PlainSource]:
        return plaintext_opener(self._paths(recording_id)[0], recording_id, self.wrapper)

    def discard(self, recording_id: str) -> None:
        discard(*self._paths(recording_id))

    def remove_stale(self, grace_s: float, max_age_s: float | None) -> int:
        return remove_stale_uploads(self.incoming, grace_s, max_age_s)

    def holdings(self) -> dict[str, tuple[str, int]]:
        return scan_incoming(self.incoming)

    def held_bytes(self, recording_id: str) -> int:
        try:
            return self._paths(recording_id)[0].stat().st_size
        except FileNotFoundError:
            return 0


def scan_incoming(incoming: Path) -> dict[str, tuple[str, int]]:
    """``recording id → (site, bytes of its part)`` for every partial upload on disk."""
    found: dict[str, tuple[str, int]] = {}
    try:
        manifests = list(incoming.glob("*.manifest"))
    except FileNotFoundError:
        return found
    for manifest_file in manifests:
        rid = manifest_file.name.removesuffix(".manifest")
        try:
            site = pb.Manifest.FromString(manifest_file.read_bytes()).site
            size = manifest_file.with_suffix(".part").stat().st_size
        except (FileNotFoundError, DecodeError):
            continue
        found[rid] = (site, size)
    return found


def remove_stale_uploads(incoming: Path, grace_s: float, max_age_s: float | None = None) -> int:
    """Partial uploads (``<id>.part``, ``<id>.manifest``, temporary files) whose newest
    file is older than the grace period, or that were begun more than ``max_age_s``
    ago (the ``.manifest`` is written once, when an upload begins: its mtime is the
    upload's age), however recently they grew; an agent that comes back starts over."""
    groups: dict[str, list[Path]] = {}
    try:
        entries = list(incoming.iterdir())
    except FileNotFoundError:
        return 0
    for path in entries:
        groups.setdefault(path.name.lstrip(".")[:32], []).append(path)
    now, removed = time.time(), 0
    too_old = now - (grace_s if max_age_s is None else min(grace_s, max_age_s))
    for recording_id, paths in groups.items():
        try:
            times = {p.name: p.stat().st_mtime for p in paths}
        except FileNotFoundError:
            continue
        begun = times.get(f"{recording_id}.manifest", min(times.values()))
        if max(times.values()) >= now - grace_s and begun >= too_old:
            continue
        for path in paths:
            path.unlink(missing_ok=True)
        removed += 1
        log.info("partial_upload_removed", recording_id=recording_id, files=len(paths))
    return removed
