"""The store's Ingest service: resumable, idempotent uploads from recording agents.

A recording arrives as ``incoming/<id>.part`` (its bytes, fsynced before the committed
size grows) beside ``incoming/<id>.manifest``. Finish checks size and sha256, moves the
bytes into the blob store, inserts the catalog row and returns the receipt. Every
rejection is a gRPC status whose message says what was wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agent.manifest import DIRECTION_NAMES, ManifestError, employees_json, validate_manifest
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.catalog import Catalog, RecordingRow, from_ms, now_ms
from agent.store.residency import DEFAULT_ALLOWED_REGIONS, region_allowed
from agent.store.vault import Vault

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 256 * 1024
_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def receipt_of(row: RecordingRow) -> pb.UploadReceipt:
    stored = Timestamp()
    stored.FromDatetime(from_ms(row.stored_at_ms))
    return pb.UploadReceipt(
        recording_id=row.recording_id, sha256=row.sha256, size=row.size, stored_at=stored
    )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class IngestService(pb_grpc.IngestServicer):
    def __init__(
        self,
        catalog: Catalog,
        vault: Vault,
        incoming: Path,
        allowed_regions: tuple[str, ...] = DEFAULT_ALLOWED_REGIONS,
    ) -> None:
        self.catalog = catalog
        self.vault = vault
        self.incoming = incoming
        self.region = vault.region
        self.allowed_regions = allowed_regions
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}

    def _paths(self, recording_id: str) -> tuple[Path, Path]:
        return (
            self.incoming / f"{recording_id}.part",
            self.incoming / f"{recording_id}.manifest",
        )

    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.QueryUploadResponse:
        if not _ID.match(request.recording_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "recording_id: expected 32 hex digits"
            )
        row = await asyncio.to_thread(self.catalog.get, request.recording_id)
        if row is not None:
            return pb.QueryUploadResponse(
                committed_size=row.size, complete=True, receipt=receipt_of(row)
            )
        part, _ = self._paths(request.recording_id)
        size = part.stat().st_size if part.exists() else 0
        return pb.QueryUploadResponse(committed_size=size)

    async def Upload(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.UploadReceipt:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty upload stream")
        if first.WhichOneof("kind") != "manifest":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the manifest"
            )
        manifest = first.manifest
        try:
            validate_manifest(manifest)
        except ManifestError as exc:
            log.warning(
                "event=upload_refused recording_id=%s reason=%r",
                manifest.recording_id[:32],
                str(exc),
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"manifest: {exc}")
        await self._check_region(manifest, context)
        lock = self._locks.setdefault(manifest.recording_id, asyncio.Lock())
        async with lock:
            try:
                return await self._receive(manifest, request_iterator, context)
            except UploadRejected as exc:
                log.warning(
                    "event=upload_refused recording_id=%s code=%s reason=%r",
                    manifest.recording_id,
                    exc.code.name,
                    str(exc),
                )
                await context.abort(exc.code, str(exc))
            finally:
                if not lock.locked():
                    self._locks.pop(manifest.recording_id, None)
        raise AssertionError("unreachable")

    async def _check_region(
        self, manifest: pb.Manifest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Residency: refuse, before anything is written, an agent outside the list."""
        if region_allowed(manifest.region, self.allowed_regions):
            return
        log.warning(
            "event=upload_refused recording_id=%s reason=region region=%r",
            manifest.recording_id,
            manifest.region,
        )
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"region: the agent declares {manifest.region!r}, outside the regions this "
            "store may keep personal data in (EU/EEA); nothing was stored",
        )

    async def _receive(
        self,
        manifest: pb.Manifest,
        requests: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.UploadReceipt:
        rid = manifest.recording_id
        existing = await asyncio.to_thread(self.catalog.get, rid)
        if existing is not None:
            if existing.sha256 != manifest.sha256:
                raise UploadRejected(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"recording {rid} is already stored with a different sha256",
                )
            log.info("event=upload_duplicate recording_id=%s outcome=original_receipt", rid)
            return receipt_of(existing)
        part, manifest_file = self._paths(rid)
        await asyncio.to_thread(self._start_part, manifest, part, manifest_file)
        committed = part.stat().st_size
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "chunk":
                    committed = await self._chunk(fd, manifest, committed, request.chunk)
                elif kind == "finish":
                    os.close(fd)
                    fd = -1
                    return await self._finish(manifest, part, manifest_file, request.finish)
                else:
                    raise UploadRejected(
                        grpc.StatusCode.INVALID_ARGUMENT, "a second manifest in one stream"
                    )
        finally:
            if fd >= 0:
                os.close(fd)
        raise UploadRejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"stream ended before finish; committed_size={committed}",
        )

    def _start_part(self, manifest: pb.Manifest, part: Path, manifest_file: Path) -> None:
        """Keep a partial upload only if it is of the same bytes (same size and sha256)."""
        data = manifest.SerializeToString(deterministic=True)
        if manifest_file.exists():
            previous = pb.Manifest.FromString(manifest_file.read_bytes())
            if (previous.sha256, previous.size) == (manifest.sha256, manifest.size):
                return
            part.unlink(missing_ok=True)
        tmp = manifest_file.with_suffix(".manifest.tmp")
        tmp.write_bytes(data)
        tmp.replace(manifest_file)
        part.touch(mode=0o600)

    async def _chunk(self, fd: int, manifest: pb.Manifest, committed: int, chunk: pb.Chunk) -> int:
        if chunk.offset != committed:
            raise UploadRejected(
                grpc.StatusCode.OUT_OF_RANGE,
                f"chunk offset {chunk.offset} but committed_size is {committed}; "
                "resume from committed_size",
            )
        if len(chunk.data) > MAX_CHUNK_BYTES or not chunk.data:
            raise UploadRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk of {len(chunk.data)} bytes: expected 1..{MAX_CHUNK_BYTES}",
            )
        if committed + len(chunk.data) > manifest.size:
            raise UploadRejected(
                grpc.StatusCode.OUT_OF_RANGE,
                f"chunk ends at {committed + len(chunk.data)}, past the manifest size "
                f"{manifest.size}",
            )
        await asyncio.to_thread(_write_durably, fd, chunk.data)
        return committed + len(chunk.data)

    async def _finish(
        self, manifest: pb.Manifest, part: Path, manifest_file: Path, finish: pb.Finish
    ) -> pb.UploadReceipt:
        rid = manifest.recording_id
        size = part.stat().st_size
        if finish.size != manifest.size or finish.sha256 != manifest.sha256:
            raise UploadRejected(
                grpc.StatusCode.INVALID_ARGUMENT, "finish does not match the manifest"
            )
        if size != manifest.size:
            raise UploadRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"finish at {size} bytes but the manifest says {manifest.size}",
            )
        actual = await asyncio.to_thread(_sha256_file, part)
        if actual != manifest.sha256:
            await asyncio.to_thread(part.unlink, True)
            await asyncio.to_thread(manifest_file.unlink, True)
            raise UploadRejected(
                grpc.StatusCode.DATA_LOSS,
                f"sha256 of the received bytes is {actual}, the manifest says "
                f"{manifest.sha256}; upload discarded, send it again",
            )
        row = await asyncio.to_thread(self._commit, manifest, part, manifest_file)
        log.info(
            "event=recording_stored recording_id=%s site=%s bytes=%d customer=%s employee=%r",
            rid,
            manifest.site,
            row.size,
            row.customer_masked,
            row.employee_name,
        )
        return receipt_of(row)

    def _commit(self, manifest: pb.Manifest, part: Path, manifest_file: Path) -> RecordingRow:
        """Key row, then encrypted blob, then recording row: a row always has its blob."""
        rid = manifest.recording_id
        blob_key = self.vault.store(rid, part, self.incoming, expected_sha256=manifest.sha256)
        row = row_from_manifest(manifest, blob_key=blob_key, region=self.region)
        if not self.catalog.insert(row):
            self.vault.discard(rid, blob_key)  # an earlier commit won; keep its copy
        part.unlink(missing_ok=True)
        manifest_file.unlink(missing_ok=True)
        stored = self.catalog.get(rid)
        assert stored is not None
        return stored


def row_from_manifest(m: pb.Manifest, blob_key: str, region: str) -> RecordingRow:
    first = m.employees[0] if m.employees else None
    return RecordingRow(
        recording_id=m.recording_id,
        site=m.site,
        source=m.source,
        call_ref=m.call_ref,
        direction=DIRECTION_NAMES[m.direction],
        started_at_ms=m.started_at.ToMilliseconds(),
        ended_at_ms=m.ended_at.ToMilliseconds(),
        service_number=m.service_number or None,
        customer_kind=m.customer.kind,
        customer_masked=m.customer.masked,
        customer_digest=m.customer.digest or None,
        customer_digest_key_id=m.customer.digest_key_id or None,
        customer_tail_sealed=m.customer.tail_sealed or None,
        employee_id=first.id if first else "unknown",
        employee_name=first.name if first else "unknown",
        employee_team=(first.team or None) if first else None,
        employees_json=employees_json(m),
        flags=",".join(m.flags),
        audio_format=m.audio_format,
        channels=m.channels,
        size=m.size,
        sha256=m.sha256,
        blob_key=blob_key,
        region=region,
        stored_at_ms=now_ms(),
    )


def _write_durably(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)
