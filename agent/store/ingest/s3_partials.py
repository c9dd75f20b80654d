"""Partial uploads in the blob bucket, where every store replica sees them (issue 18).

A cut upload resumes on ANY replica from the durable offset: the resumable state is
objects in the same S3 bucket as the blobs, under ``partials/<blob prefix><id>/``:

- ``upload``: JSON with what identifies the upload (the manifest's sha256, size and
  site: no personal data, unlike the manifest) and its own AES-256 key wrapped by the
  master key (like a recording's data key: context ``<id>/part``, the same as a
  file partial's) and when it began. Written once, with ``If-None-Match: *``, so two
  replicas that start the same upload agree on one key.
- ``<offset, 16 digits>``: a *segment*, the plaintext bytes ``[offset, offset + n)``
  of the recording sealed as ``nonce (12) | AES-GCM(part key, bytes, aad =
  "callrec-part-s3-v1" | id | offset (u64))``, so its plaintext length is its object
  size less 28 and a segment can't be moved to another offset or recording.

The committed size is the end of the chain of segments from 0 (one LIST, no key
needed); a segment off the chain (left by a stream that raced a resume) is ignored
and removed with the rest. A stream buffers what it receives and writes a segment
every ``window_bytes`` (and when it ends without its finish), so a replica killed
mid-stream loses at most one window: what an agent re-sends after a resume on
another replica is at most the window plus what was in flight. An upload finished in
one stream that never filled a window writes nothing here at all: its bytes go from
the stream's buffer straight to the vault.

Every replica's sweeper removes partial uploads untouched for the grace period or
begun more than ``part_max_age`` ago (S3 times: LastModified); deletes are idempotent.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import logs
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.archive.crypto import TAG_BYTES, CryptoError, new_data_key
from agent.store.ingest.partials import PartSink, PlainSource
from agent.store.keys.master import KeyWrapper

log = logs.get_logger(__name__)

WINDOW_BYTES = 1024 * 1024  # a segment is written once this much is buffered
NONCE_BYTES = 12
SEGMENT_OVERHEAD = NONCE_BYTES + TAG_BYTES
_AAD = b"callrec-part-s3-v1\x00"
_UPLOAD = "upload"
_DELETE_BATCH = 1000
_CLEAN_MAX = 10_000


def _segment_name(offset: int) -> str:
    return f"{offset:016d}"


def _aad(recording_id: str, offset: int) -> bytes:
    return _AAD + recording_id.encode() + b"\x00" + offset.to_bytes(8, "big")


def _context(recording_id: str) -> bytes:
    return f"{recording_id}/part".encode()


@dataclass
class Listing:
    """The objects of one partial upload."""

    segments: dict[int, int] = field(default_factory=dict)  # offset → plaintext bytes
    names: list[str] = field(default_factory=list)
    stored_bytes: int = 0
    begun: dt.datetime | None = None  # the upload object's LastModified
    newest: dt.datetime | None = None

    def chain(self, end: int | None = None) -> list[tuple[int, int]]:
        """The segments from offset 0 on, each starting where the last ended (up to
        ``end``: where a stream's own buffer begins)."""
        found, offset = [], 0
        while (end is None or offset < end) and (length := self.segments.get(offset)):
            found.append((offset, length))
            offset += length
        return found

    def committed(self) -> int:
        return sum(length for _, length in self.chain())


@dataclass(frozen=True)
class UploadDoc:
    sha256: str
    size: int
    site: str
    key_id: str
    wrapped: bytes

    @classmethod
    def of(cls, manifest: pb.Manifest, key_id: str, wrapped: bytes) -> UploadDoc:
        return cls(manifest.sha256, manifest.size, manifest.site, key_id, wrapped)

    def same_upload(self, manifest: pb.Manifest) -> bool:
        return (self.sha256, self.size, self.site) == (
            manifest.sha256,
            manifest.size,
            manifest.site,
        )

    def encode(self) -> bytes:
        wrapped = base64.b64encode(self.wrapped).decode()
        doc = {"sha256": self.sha256, "size": self.size, "site": self.site,
               "key_id": self.key_id, "wrapped": wrapped}  # fmt: skip
        return json.dumps(doc).encode()

    @classmethod
    def decode(cls, data: bytes, recording_id: str) -> UploadDoc:
        try:
            doc = json.loads(data)
            return cls(str(doc["sha256"]), int(doc["size"]), str(doc["site"]),
                       str(doc["key_id"]), base64.b64decode(doc["wrapped"]))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise CryptoError(recording_id, f"partial upload's state unreadable ({exc})") from None


class S3Partials:
    """``partials.Partials`` in an S3 bucket (boto3 client of the blob store)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        wrapper: KeyWrapper,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix  # e.g. "partials/recordings/"
        self.wrapper = wrapper
        self.window_bytes = window_bytes
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # bytes this replica's streams left, per upload
        # Uploads found with nothing in the bucket whose stream wrote nothing since:
        # their commit has nothing to discard (saves a LIST per recording).
        self._clean: set[str] = set()

    @property
    def shared(self) -> bool:
        return True

    def _dir(self, recording_id: str) -> str:
        return f"{self.prefix}{recording_id}/"

    # ------------------------------------------------------------ reading the state

    def listing(self, recording_id: str) -> Listing:
        found = Listing()
        base = self._dir(recording_id)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base
        )
        for page in pages:
            for item in page.get("Contents", []):
                _note(found, str(item["Key"])[len(base) :], item)
                found.names.append(str(item["Key"]))
        return found

    def _doc(self, recording_id: str) -> UploadDoc | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=self._dir(recording_id) + _UPLOAD
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return UploadDoc.decode(answer["Body"].read(), recording_id)

    def committed_size(self, recording_id: str, site: str | None) -> int:
        found = self.listing(recording_id)
        if found.begun is None:
            return 0
        if site is not None:
            doc = self._doc(recording_id)
            if doc is None or doc.site != site:
                return 0
        return found.committed()

    def resumable_size(self, manifest: pb.Manifest) -> int:
        rid = manifest.recording_id
        found = self.listing(rid)
        if not found.names:
            with self._lock:
                if len(self._clean) >= _CLEAN_MAX:  # streams that never came back
                    self._clean.clear()
                self._clean.add(rid)
        if found.begun is None or not found.segments:
            return 0
        doc = self._doc(rid)
        if doc is None or not doc.same_upload(manifest):
            return 0
        return min(found.committed(), manifest.size)

    # ------------------------------------------------------------ writing

    def open(self, manifest: pb.Manifest, committed: int) -> PartSink:
        rid = manifest.recording_id
        if committed == 0:
            return S3Sink(self, manifest, 0, new_data_key(), upload_written=False)
        doc = self._doc(rid)
        if doc is None:
            raise CryptoError(rid, "partial upload's state vanished")
        key = self.wrapper.unwrap(doc.key_id, doc.wrapped, _context(rid))
        return S3Sink(self, manifest, committed, key, upload_written=True)

    def _begin(self, manifest: pb.Manifest, key: bytes) -> bytes:
        """Write the upload object once; returns the key to use (another replica's,
        when it began the same upload first)."""
        from botocore.exceptions import ClientError

        rid = manifest.recording_id
        with self._lock:
            self._clean.discard(rid)
        key_id, wrapped = self.wrapper.wrap(key, _context(rid))
        body = UploadDoc.of(manifest, key_id, wrapped).encode()
        name = self._dir(rid) + _UPLOAD
        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*")
            return key
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise
        doc = self._doc(rid)
        if doc is not None and doc.same_upload(manifest):
            return self.wrapper.unwrap(doc.key_id, doc.wrapped, _context(rid))
        self.discard(rid)  # an earlier upload of other bytes under this id: start over
        self.client.put_object(Bucket=self.bucket, Key=name, Body=body)
        return key

    def _put_segment(self, recording_id: str, offset: int, sealed: bytes) -> None:
        name = self._dir(recording_id) + _segment_name(offset)
        with self._lock:
            self._clean.discard(recording_id)
        self.client.put_object(Bucket=self.bucket, Key=name, Body=sealed)
        with self._lock:
            if len(self._held) >= _CLEAN_MAX:  # uploads finished on other replicas
                self._held.clear()
            self._held[recording_id] = self._held.get(recording_id, 0) + len(sealed)

    # ------------------------------------------------------------ finishing, removing

    def opener(self, recording_id: str, sink: PartSink | None) -> Callable[[], PlainSource]:
        own = sink if isinstance(sink, S3Sink) else None
        return lambda: SegmentReader(self, recording_id, own)

    def read_segment(self, recording_id: str, key: bytes, offset: int) -> bytes:
        name = self._dir(recording_id) + _segment_name(offset)
        sealed = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        try:
            return AESGCM(key).decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(recording_id, offset)
            )
        except InvalidTag:
            raise CryptoError(recording_id, f"partial upload segment at {offset} fails") from None

    def discard(self, recording_id: str) -> None:
        with self._lock:
            clean = recording_id in self._clean
            self._clean.discard(recording_id)
        if not clean:
            self._delete(self.listing(recording_id).names)
        with self._lock:
            self._held.pop(recording_id, None)

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), _DELETE_BATCH):
            batch = names[start : start + _DELETE_BATCH]
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True},
            )

    def _all(self) -> dict[str, Listing]:
        found: dict[str, Listing] = {}
        names: dict[str, list[str]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                rid, _, leaf = str(item["Key"])[len(self.prefix) :].partition("/")
                _note(found.setdefault(rid, Listing()), leaf, item)
                names.setdefault(rid, []).append(str(item["Key"]))
        for rid, listing in found.items():
            listing.names = names[rid]
        return found

    def remove_stale(self, grace_s: float, max_age_s: float | None) -> int:
        now = dt.datetime.now(dt.UTC)
        untouched = now - dt.timedelta(seconds=grace_s)
        too_old = now - dt.timedelta(seconds=grace_s if max_age_s is None else max_age_s)
        removed = 0
        for rid, listing in self._all().items():
            begun = listing.begun or listing.newest
            if listing.newest is None or begun is None:
                continue
            if listing.newest >= untouched and begun >= too_old:
                continue
            self._delete(listing.names)
            removed += 1
            log.info("partial_upload_removed", recording_id=rid, objects=len(listing.names))
        return removed

    def holdings(self) -> dict[str, tuple[str, int]]:
        held: dict[str, tuple[str, int]] = {}
        for rid, listing in self._all().items():
            doc = self._doc(rid) if listing.begun is not None else None
            if doc is not None:
                held[rid] = (doc.site, listing.stored_bytes)
        return held

    def held_bytes(self, recording_id: str) -> int:
        """What this replica's streams wrote for the upload and did not discard (the
        other replicas' share is counted at ``holdings``)."""
        with self._lock:
            return self._held.get(recording_id, 0)


def _note(listing: Listing, leaf: str, item: dict[str, Any]) -> None:
    size, modified = int(item["Size"]), item["LastModified"]
    listing.stored_bytes += size
    if listing.newest is None or modified > listing.newest:
        listing.newest = modified
    if leaf == _UPLOAD:
        listing.begun = modified
    elif leaf.isdigit() and size > SEGMENT_OVERHEAD:
        listing.segments[int(leaf)] = size - SEGMENT_OVERHEAD


class S3Sink:
    """One stream's appends: buffered, sealed and written a window at a time."""

    def __init__(
        self,
        store: S3Partials,
        manifest: pb.Manifest,
        base: int,
        key: bytes,
        upload_written: bool,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.rid = manifest.recording_id
        self.base = base  # where this stream began (the durable offset then)
        self.offset = base  # where the buffer begins
        self.key = key
        self.upload_written = upload_written
        self.buffer = bytearray()

    def append(self, data: bytes, sync: bool) -> None:
        self.buffer += data
        if sync or len(self.buffer) >= self.store.window_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if not self.upload_written:
            self.key = self.store._begin(self.manifest, self.key)
            self.upload_written = True
        nonce = os.urandom(NONCE_BYTES)
        data = bytes(self.buffer)
        sealed = nonce + AESGCM(self.key).encrypt(nonce, data, _aad(self.rid, self.offset))
        self.store._put_segment(self.rid, self.offset, sealed)
        self.offset += len(data)
        self.buffer.clear()

    def close(self, sync: bool) -> None:
        if sync:
            self.flush()
        self.buffer.clear()
        with self.store._lock:
            self.store._clean.discard(self.rid)


class SegmentReader:
    """The plaintext of a partial upload: the chain of segments before the stream's
    own buffer (read from the bucket when a stream resumed or wrote some), then the
    buffer."""

    def __init__(self, store: S3Partials, recording_id: str, sink: S3Sink | None) -> None:
        self._store, self._rid = store, recording_id
        if sink is not None and sink.base == 0 and sink.offset == 0:
            self._chain: list[tuple[int, int]] = []  # all of it is in the buffer
            self._key = sink.key
        else:
            end = None if sink is None else sink.offset
            self._chain = store.listing(recording_id).chain(end)
            doc = store._doc(recording_id)
            if doc is None:
                raise CryptoError(recording_id, "partial upload's state vanished")
            self._key = store.wrapper.unwrap(doc.key_id, doc.wrapped, _context(recording_id))
        durable = sum(length for _, length in self._chain)
        self._tail = bytes(sink.buffer) if sink is not None and sink.offset == durable else b""
        self.size = durable + len(self._tail)
        self._pieces = self._iterate()
        self._pending = b""

    def _iterate(self) -> Iterator[bytes]:
        for offset, _ in self._chain:
            yield self._store.read_segment(self._rid, self._key, offset)
        if self._tail:
            yield self._tail

    def read(self, count: int = -1) -> bytes:
        while count < 0 or len(self._pending) < count:
            more = next(self._pieces, None)
            if more is None:
                break
            self._pending += more
        take = len(self._pending) if count < 0 else count
        data, self._pending = self._pending[:take], self._pending[take:]
        return data

    def close(self) -> None:
        self._pieces = iter(())
        self._pending = b""
