"""The store's operator console: listing and export, on the local admin socket only.

The socket (``console.sock``, mode 0600) admits the store's own user and root. An
export needs a reason and one of the notice's purposes (verification, legal, training,
security): "maintenance" is not a purpose the customers were told about. The audit
log names the operator by the kernel's account of the client (``console_gate``:
``console:<login>@<host>``, the session's login uid when there is one, with uid and
pid in the detail). When the login is a person in the directory, that person needs
a training date, as in Access. For exports by people, use Access (``callrec export``),
which checks the person's role and team.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from agent import logs
from agent.capture import Direction
from agent.directory import Directory, DirectoryError
from agent.manifest import AUDIO_FORMATS, timestamp
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.redaction import redact_numbers
from agent.store.access.rules import scrub
from agent.store.archive.crypto import CryptoError
from agent.store.archive.vault import Vault
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, RecordingRow, from_ms
from agent.store.console_gate import peer_of

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
        pauses=[
            pb.Pause(
                start=timestamp(dt.datetime.fromisoformat(p["start"])),
                end=timestamp(dt.datetime.fromisoformat(p["end"])),
                who=p["who"],
            )
            for p in row.pauses
        ],
    )
    return pb.RecordingInfo(
        manifest=manifest,
        stored_at=timestamp(from_ms(row.stored_at_ms)),
        duration_ms=row.duration_ms,
    )


PURPOSES = ("verification", "legal", "training", "security")


class ConsoleService(pb_grpc.ConsoleServicer):
    def __init__(self, catalog: Catalog, vault: Vault, directory_file: Path | None = None) -> None:
        self.catalog = catalog
        self.vault = vault
        self.directory_file = directory_file

    def _untrained(self, login: str) -> str | None:
        """Why a login that is a directory person may not export (else None)."""
        if self.directory_file is None:
            return None
        try:
            person = Directory.load(self.directory_file).people.get(login)
        except DirectoryError:
            return "the directory cannot be read"
        if person is not None and person.trained is None:
            return f"{login} is a person in the directory without a training date"
        return None

    async def ListRecordings(
        self, request: pb.ListRecordingsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRecordingsResponse:
        since = request.since.ToMilliseconds() if request.HasField("since") else None
        until = request.until.ToMilliseconds() if request.HasField("until") else None
        limit = request.limit if 0 < request.limit <= 10_000 else 100
        rows = await asyncio.to_thread(self.catalog.list, since, until, limit)
        actor, detail = _operator(context)
        said = (actor, "maintenance", detail)
        reason = f"console list, {len(rows)} rows"
        await asyncio.to_thread(self._audit, "search", None, reason, "allowed", said)
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
        if request.purpose not in PURPOSES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "purpose: " + ", ".join(PURPOSES))
        actor, detail = _operator(context)
        reason = scrub(redact_numbers(request.reason.strip()))
        said = (actor, request.purpose, detail)
        login = actor.removeprefix("console:").rpartition("@")[0]
        untrained = await asyncio.to_thread(self._untrained, login)
        if untrained is not None:
            await asyncio.to_thread(self._audit, "export", row.recording_id, reason, "denied", said)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, untrained)
        if row.restricted:
            await asyncio.to_thread(self._audit, "export", row.recording_id, reason, "denied", said)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "processing of this recording is restricted (GDPR Art. 18); only the privacy "
                "officer can export it, for a legal purpose",
            )
        await asyncio.to_thread(self._audit, "export", row.recording_id, reason, "allowed", said)
        log.info(
            "console_export",
            recording_id=row.recording_id,
            actor=actor,
            purpose=request.purpose,
            reason=reason,
        )
        # Decrypted on the way out: byte-identical to what the agent uploaded.
        chunks: Iterator[bytes] = self.vault.read(row.recording_id, row.blob_key)
        await context.send_initial_metadata((("callrec-total-bytes", str(row.size)),))
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
        self,
        action: str,
        recording_id: str | None,
        reason: str,
        outcome: str = "allowed",
        said: tuple[str, str, str] | None = None,
    ) -> None:
        """The console is the store host's administrators' tool: audited like any access
        (``said``: the actor, purpose and peer an export names)."""
        default = (f"console@{socket.gethostname()}", "maintenance", f"store_uid={os.getuid()}")
        actor, purpose, detail = said or default
        with self.catalog.engine.begin() as conn:
            audit.append(
                conn,
                actor,
                action,
                recording_id,
                reason,
                outcome,
                purpose=purpose,
                detail=detail,
            )


def _operator(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
    """``console:<login>@<host>`` and ``uid=… login_uid=… pid=…`` of the client."""
    peer = peer_of(context.peer())
    login = peer.login if peer is not None else "unknown"
    return f"console:{login}@{socket.gethostname()}"[:200], peer.detail if peer else "-"


def file_suffix(audio_format: str) -> str:
    return "." + AUDIO_FORMATS[audio_format]
