"""The store's operator console: listing and export, on the local admin socket only."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from agent import logs
from agent.capture import Direction
from agent.manifest import AUDIO_FORMATS, timestamp
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.redaction import redact_numbers
from agent.store import audit
from agent.store.catalog import Catalog, RecordingRow, from_ms
from agent.store.crypto import CryptoError
from agent.store.vault import Vault

log = logs.get_logger(__name__)

_DIRECTIONS = {
    Direction.INBOUND.value: pb.DIRECTION_INBOUND,
    Direction.OUTBOUND.value: pb.DIRECTION_OUTBOUND,
}


def info_of(row: RecordingRow) -> pb.RecordingInfo:
    manifest = pb.Manifest(
        recording_id=row.recording_id,
        site=row.site,
        source=row.source,
        call_ref=row.call_ref,
        direction=_DIRECTIONS.get(row.direction, pb.DIRECTION_UNSPECIFIED),
        started_at=timestamp(from_ms(row.started_at_ms)),
        ended_at=timestamp(from_ms(row.ended_at_ms)),
        service_number=row.service_number or "",
        customer=pb.Customer(kind=row.customer_kind, masked=row.customer_masked),
        employees=[
            pb.Employee(
                id=e["id"], name=e["name"], aor=e.get("aor") or "", team=e.get("team") or ""
            )
            for e in row.employees
        ],
        flags=[f for f in row.flags.split(",") if f],
        audio_format=row.audio_format,
        size=row.size,
        sha256=row.sha256,
        channels=row.channels,
        region=row.region,
    )
    return pb.RecordingInfo(
        manifest=manifest,
        stored_at=timestamp(from_ms(row.stored_at_ms)),
        duration_ms=row.duration_ms,
    )


class ConsoleService(pb_grpc.ConsoleServicer):
    def __init__(self, catalog: Catalog, vault: Vault) -> None:
        self.catalog = catalog
        self.vault = vault

    async def ListRecordings(
        self, request: pb.ListRecordingsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRecordingsResponse:
        since = request.since.ToMilliseconds() if request.HasField("since") else None
        until = request.until.ToMilliseconds() if request.HasField("until") else None
        limit = request.limit if 0 < request.limit <= 10_000 else 100
        rows = await asyncio.to_thread(self.catalog.list, since, until, limit)
        await asyncio.to_thread(self._audit, "search", None, f"console list, {len(rows)} rows")
        log.info("console_list", count=len(rows))
        return pb.ListRecordingsResponse(recordings=[info_of(r) for r in rows])

    async def ExportAudio(
        self, request: pb.ExportAudioRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.AudioChunk]:
        row = await asyncio.to_thread(self.catalog.get, request.recording_id)
        if row is None or row.destroy_reason is not None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no recording {request.recording_id!r}")
        assert row is not None
        if not request.reason.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "reason: say why you export")
        reason = redact_numbers(request.reason.strip())
        if row.restricted:
            await asyncio.to_thread(self._audit, "export", row.recording_id, reason, "denied")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "processing of this recording is restricted (GDPR Art. 18); only the privacy "
                "officer can export it, for a legal purpose",
            )
        await asyncio.to_thread(self._audit, "export", row.recording_id, reason)
        log.info("console_export", recording_id=row.recording_id, reason=reason)
        # Decrypted on the way out: byte-identical to what the agent uploaded.
        chunks: Iterator[bytes] = self.vault.read(row.recording_id, row.blob_key)
        first = True
        while True:
            try:
                data = await asyncio.to_thread(next, chunks, b"")
            except CryptoError as exc:
                log.error("export_failed", recording_id=row.recording_id, reason=str(exc))
                await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            if data == b"":
                return
            yield pb.AudioChunk(data=data, audio_format=row.audio_format if first else "")
            first = False

    def _audit(
        self, action: str, recording_id: str | None, reason: str, outcome: str = "allowed"
    ) -> None:
        """The console is the store host's administrators' tool: audited like any access."""
        with self.catalog.engine.begin() as conn:
            audit.append(
                conn,
                f"console@{socket.gethostname()}",
                action,
                recording_id,
                reason,
                outcome,
                purpose="maintenance",
            )


def file_suffix(audio_format: str) -> str:
    return "." + AUDIO_FORMATS[audio_format]
