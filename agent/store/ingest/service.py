"""The store's Ingest service: resumable, idempotent uploads from recording agents.

A recording arrives as a partial upload (``partials``: ``incoming/<id>.part`` beside
``incoming/<id>.manifest`` on one store; objects in the shared bucket when blobs are
S3, so any replica resumes it), created only when the first valid chunk arrives, so a
refused upload leaves nothing behind. The part is made durable every
``SYNC_EVERY_BYTES`` (on S3 every window, ``s3_partials``) and whenever a stream ends
without its finish, so a resumed upload builds on durable bytes (after a crash of the
host itself the tail may be lost or damaged: a shorter part resumes from its size, a
damaged one fails the sha256 at finish and is sent again; the agent keeps its copy
until the receipt). Finish checks the size, then the vault encrypts the part into the
blob store, hashing exactly the bytes it encrypts: a sha256 other than the manifest's
discards the upload (DATA_LOSS). Only then is the catalog row inserted and the receipt
returned, so a receipt always means the encrypted blob and its row are durable. Every
rejection is a gRPC status whose message says what was wrong.

Over mutual TLS the site is the client certificate's (``agent.certs``): a manifest
for another site is refused with PERMISSION_DENIED, so the ``site`` of a catalog row
is the site that sent it.

This module holds the stream itself (chunks, resume, finish, commit); what an upload
must pass before anything is written is ``admission``, the manifest → catalog row
mapping and the receipt are ``rows``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from agent import logs
from agent.manifest import ManifestError, validate_discard_manifest
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import KeyFileError
from agent.store import monitoring
from agent.store.archive.crypto import CryptoError
from agent.store.archive.residency import DEFAULT_ALLOWED_REGIONS
from agent.store.archive.vault import KeyShredded, SourceMismatch, Vault
from agent.store.catalog import Catalog, RecordingRow
from agent.store.ingest import admission, discards
from agent.store.ingest.denylist import DenyList
from agent.store.ingest.limits import LimitExceeded, Limits, UploadLimits
from agent.store.ingest.partials import FilePartials, Partials, PartSink
from agent.store.ingest.rows import receipt_of, row_from_manifest
from agent.store.keys.numbers import SealCache, SealError

log = logs.get_logger(__name__)

MAX_CHUNK_BYTES = 256 * 1024
SEAL_UNOPENABLE = "customer_seal_unopenable"  # flag: no key of seal.pem opens the tail
# The part is fsynced after this many bytes (and when a stream ends without finish):
# one fsync per chunk cost ~0.3 ms each, a third of the store's receive time.
SYNC_EVERY_BYTES = 8 * 1024 * 1024
# A second stream for a recording waits this long for the first to end, then ABORTED.
LOCK_WAIT_S = 10.0
# A stream that sends nothing for this long is closed (DEADLINE_EXCEEDED); what it
# sent is kept for a resume.
IDLE_TIMEOUT_S = 60.0
_ID = re.compile(r"[0-9a-f]{32}")


class UploadRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class UploadInterrupted(UploadRejected):
    """The stream ended without a finish (the agent went away): what arrived is kept."""


class IngestService(pb_grpc.IngestServicer):
    def __init__(
        self,
        catalog: Catalog,
        vault: Vault,
        incoming: Path,
        allowed_regions: tuple[str, ...] = DEFAULT_ALLOWED_REGIONS,
        authenticate: bool = False,
        limits: Limits | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        seal_key_file: Path | None = None,
        partials: Partials | None = None,
    ) -> None:
        self.seal_key_file = seal_key_file  # to check that each sealed tail opens
        self.destroy_live: Callable[[str], int] | None = None  # live.archive_queue.destroy (server)
        self._seal = SealCache(seal_key_file) if seal_key_file is not None else None
        self.catalog = catalog
        self.idle_timeout_s = idle_timeout_s
        self.authenticate = authenticate
        self.vault = vault
        self.incoming = incoming
        self.region = vault.region
        self.allowed_regions = allowed_regions
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.partials = partials or FilePartials(incoming, vault.wrapper)
        self.limits = UploadLimits(self.partials, limits or Limits())
        self.denylist = DenyList(catalog)
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    async def QueryUpload(
        self, request: pb.QueryUploadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.QueryUploadResponse:
        if not _ID.fullmatch(request.recording_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "recording_id: expected 32 hex digits"
            )
        site = await self.peer_site(context)
        row = await asyncio.to_thread(self.catalog.get, request.recording_id)
        if row is not None and site is not None and row.site != site:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"recording {request.recording_id} was not sent by site {site!r}",
            )
        if row is not None:
            return pb.QueryUploadResponse(
                committed_size=row.size, complete=True, receipt=receipt_of(row)
            )
        size = await asyncio.to_thread(self.partials.committed_size, request.recording_id, site)
        return pb.QueryUploadResponse(committed_size=size)

    async def Discard(
        self, request: pb.DiscardRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UploadReceipt:
        """A call stopped and discarded at the customer's request (agent.store.ingest.discards)."""
        site = await self.peer_site(context)
        manifest = request.manifest
        try:
            validate_discard_manifest(manifest)
        except ManifestError as exc:
            rid = manifest.recording_id[:32]
            log.warning("discard_refused", recording_id=rid, reason=str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"manifest: {exc}")
        await self.check_site(manifest, site, context)
        rid = manifest.recording_id
        actor = f"agent:{site or manifest.site}"
        try:
            async with self._exclusive(manifest.recording_id):
                row = await asyncio.to_thread(
                    discards.discard, self.catalog, manifest, self.partials, actor
                )
                if self.destroy_live is not None:  # what it streamed live, if it did
                    await asyncio.to_thread(self.destroy_live, manifest.recording_id)
        except UploadRejected as exc:
            await context.abort(exc.code, str(exc))
        return discards.receipt(row)

    async def peer_site(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        """The caller's site, as for uploads (also agent.store.live.service)."""
        return await admission.peer_site(context, self.authenticate, self.denylist)

    async def check_site(
        self, manifest: pb.Manifest, site: str | None, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await admission.check_site(manifest, site, context)

    async def check_region(
        self, manifest: pb.Manifest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await admission.check_region(manifest, self.allowed_regions, context)

    async def Upload(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.UploadReceipt:
        """One upload stream, counted: in progress, stored, or refused by its code."""
        monitoring.UPLOADS_IN_PROGRESS.inc()
        try:
            return await self._upload(request_iterator, context)
        except BaseException:
            code = context.code()  # what context.abort set; None: cancelled under us
            name = code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"
            monitoring.UPLOADS_REFUSED.labels(name).inc()
            raise
        finally:
            monitoring.UPLOADS_IN_PROGRESS.dec()

    async def _upload(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.UploadReceipt:
        site = await self.peer_site(context)
        manifest = await admission.manifest_of(request_iterator, context, self.idle_timeout_s)
        admission.drop_agent_digest(manifest)
        await self.check_site(manifest, site, context)
        await self.check_region(manifest, context)
        try:
            with self._slot(site or manifest.site, manifest):
                async with self._exclusive(manifest.recording_id):
                    return await self._receive(manifest, request_iterator)
        except UploadRejected as exc:
            interrupted = isinstance(exc, UploadInterrupted)
            log.log(
                logging.INFO if interrupted else logging.WARNING,
                "upload_interrupted" if interrupted else "upload_refused",
                recording_id=manifest.recording_id,
                code=exc.code.name,
                reason=str(exc),
            )
            await context.abort(exc.code, str(exc))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _slot(self, site: str, manifest: pb.Manifest) -> Iterator[None]:
        """A place among the site's uploads (``upload_limits``), or RESOURCE_EXHAUSTED."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.limits.upload(site, manifest.recording_id, manifest.size))
            except LimitExceeded as exc:
                raise UploadRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            yield

    @contextlib.asynccontextmanager
    async def _exclusive(self, recording_id: str) -> AsyncIterator[None]:
        """One stream per recording at a time; a second one waits, then gives up."""
        lock = self._locks.setdefault(recording_id, asyncio.Lock())
        self._lock_users[recording_id] = self._lock_users.get(recording_id, 0) + 1
        try:
            try:
                async with asyncio.timeout(LOCK_WAIT_S):
                    await lock.acquire()
            except TimeoutError:
                raise UploadRejected(
                    grpc.StatusCode.ABORTED,
                    f"another upload of {recording_id} is in progress; retry later",
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            self._lock_users[recording_id] -= 1
            if not self._lock_users[recording_id]:
                del self._lock_users[recording_id], self._locks[recording_id]

    async def _receive(
        self, manifest: pb.Manifest, requests: AsyncIterator[pb.UploadRequest]
    ) -> pb.UploadReceipt:
        rid = manifest.recording_id
        existing = await asyncio.to_thread(self.catalog.get, rid)
        if existing is not None:
            if existing.sha256 != manifest.sha256 or existing.site != manifest.site:
                raise UploadRejected(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"recording {rid} is already stored with a different sha256 or site",
                )
            log.info("upload_duplicate", recording_id=rid, outcome="original_receipt")
            return receipt_of(existing)
        committed = await asyncio.to_thread(self.partials.resumable_size, manifest)
        started = time.monotonic()
        writer: PartSink | None = None
        unsynced, keep = 0, True
        try:
            while (request := await self._next(requests, committed)) is not None:
                kind = request.WhichOneof("kind")
                if kind == "chunk":
                    _check_chunk(manifest, committed, request.chunk)
                    if writer is None:
                        writer = await asyncio.to_thread(self.partials.open, manifest, committed)
                    unsynced += len(request.chunk.data)
                    sync = unsynced >= SYNC_EVERY_BYTES
                    await asyncio.to_thread(writer.append, request.chunk.data, sync)
                    unsynced = 0 if sync else unsynced
                    committed += len(request.chunk.data)
                elif kind == "finish":
                    try:
                        receipt = await self._finish(manifest, writer, committed, request, started)
                    except UploadRejected as exc:  # DATA_LOSS: the bytes were discarded
                        keep = exc.code != grpc.StatusCode.DATA_LOSS
                        raise
                    keep = False  # stored: the vault made the encrypted copy durable
                    return receipt
                else:
                    raise UploadRejected(
                        grpc.StatusCode.INVALID_ARGUMENT, "a second manifest in one stream"
                    )
        finally:
            if writer is not None:  # shielded: a cut stream's bytes are kept for a resume
                close = asyncio.to_thread(writer.close, unsynced > 0 and keep)
                await asyncio.shield(close)
        raise UploadInterrupted(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"stream ended before finish; committed_size={committed}",
        )

    async def _next(
        self, requests: AsyncIterator[pb.UploadRequest], committed: int
    ) -> pb.UploadRequest | None:
        """The next message (None: the stream ended), or DEADLINE_EXCEEDED when the
        agent sends nothing for ``idle_timeout_s`` (what arrived is kept)."""
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise UploadInterrupted(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"nothing received for {self.idle_timeout_s:.0f} s; stream closed, "
                f"committed_size={committed}",
            ) from None

    async def _finish(
        self,
        manifest: pb.Manifest,
        writer: PartSink | None,
        size: int,
        request: pb.UploadRequest,
        started: float,
    ) -> pb.UploadReceipt:
        rid, finish = manifest.recording_id, request.finish
        received = time.monotonic()
        if finish.size != manifest.size or finish.sha256 != manifest.sha256:
            raise UploadRejected(
                grpc.StatusCode.INVALID_ARGUMENT, "finish does not match the manifest"
            )
        if size != manifest.size:
            raise UploadRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"finish at {size} bytes but the manifest says {manifest.size}",
            )
        try:
            row, inserted = await asyncio.to_thread(self._commit, manifest, writer)
        except SourceMismatch as exc:
            await asyncio.to_thread(self.partials.discard, rid)
            raise UploadRejected(
                grpc.StatusCode.DATA_LOSS,
                f"sha256 of the received bytes is {exc.actual}, the manifest says "
                f"{manifest.sha256}; upload discarded, send it again",
            ) from None
        except CryptoError as exc:  # a partial upload that does not open (torn, raced)
            await asyncio.to_thread(self.partials.discard, rid)
            log.warning("partial_upload_unreadable", recording_id=rid, reason=str(exc))
            raise UploadRejected(
                grpc.StatusCode.DATA_LOSS,
                "the bytes kept for this upload could not be read back; upload "
                "discarded, send it again",
            ) from None
        if not inserted:  # another stream (another replica) stored it first
            if row.sha256 != manifest.sha256 or row.site != manifest.site:
                raise UploadRejected(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"recording {rid} is already stored with a different sha256 or site",
                )
            log.info("upload_duplicate", recording_id=rid, outcome="lost_race_original_receipt")
            return receipt_of(row)
        log.info(
            "recording_stored",
            recording_id=rid,
            site=manifest.site,
            site_verified="certificate" if self.authenticate else "no",
            bytes=row.size,
            customer=row.customer_masked,
            employee=row.employee_name,
            receive_s=round(received - started, 3),
            seal_s=round(time.monotonic() - received, 3),
        )
        monitoring.UPLOADS_STORED.inc()
        monitoring.BYTES_STORED.inc(row.size)
        return receipt_of(row)

    def _commit(self, manifest: pb.Manifest, writer: PartSink | None) -> tuple[RecordingRow, bool]:
        """Key row, then encrypted blob (whose sha256 must be the manifest's, else
        SourceMismatch), then recording row: a row always has its blob. Returns the
        stored row and whether this call inserted it (False: an earlier commit won)."""
        rid = manifest.recording_id
        blob_key = self.vault.store(
            rid,
            self.incoming / f"{rid}.part",  # not read: the opener gives the plaintext
            self.incoming,
            expected_sha256=manifest.sha256,
            opener=self.partials.opener(rid, writer),
        )
        self._check_seal(manifest)
        row = row_from_manifest(manifest, blob_key=blob_key, region=self.region)
        try:
            inserted = self.vault.commit_row(row)
        except KeyShredded:  # the commit outlived [store] orphan_grace: keep the partial
            self.vault.discard(rid, blob_key)
            raise UploadRejected(
                grpc.StatusCode.ABORTED,
                f"recording {rid} took longer to commit than [store] orphan_grace and "
                "its new data key was removed as an orphan; nothing was stored, retry",
            ) from None
        if not inserted:
            self.vault.discard(rid, blob_key)  # an earlier commit won; keep its copy
        elif manifest.pauses:
            discards.audit_pauses(self.catalog, manifest)
        self.partials.discard(rid)
        stored = self.catalog.get(rid)
        assert stored is not None
        return stored, inserted

    def _check_seal(self, manifest: pb.Manifest) -> None:
        """A sealed tail the store cannot open (an agent with a wrong or stale
        seal.pub.pem) would make the call unfindable by number: flag it, and say so.
        The opened digits live only in this function's memory."""
        sealed = manifest.customer.tail_sealed
        if self._seal is None or not sealed:
            return
        try:
            self._seal.keyring().open(sealed)
        except KeyFileError as exc:
            log.error("seal_key_unusable", recording_id=manifest.recording_id, reason=str(exc))
        except SealError:
            manifest.flags.append(SEAL_UNOPENABLE)
            log.warning(
                "customer_seal_unopenable",
                recording_id=manifest.recording_id,
                site=manifest.site,
                action="give the agent the store's current seal.pub.pem",
            )


def _check_chunk(manifest: pb.Manifest, committed: int, chunk: pb.Chunk) -> None:
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
            f"chunk ends at {committed + len(chunk.data)}, past the manifest size {manifest.size}",
        )
