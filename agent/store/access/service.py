"""The Access service on the store's public gRPC port: authenticate the person
(``authorization: Bearer <token>``), decide with the pure rules of ``access.py``,
audit the outcome (allowed or not), then serve.

Status codes: a missing/unknown/revoked token or a person no longer in the directory →
UNAUTHENTICATED; the rules say no → PERMISSION_DENIED; a malformed request (no
purpose, no reason where one is needed, a bad id or number) → INVALID_ARGUMENT; an
unknown or destroyed recording → NOT_FOUND; a held recording to erase →
FAILED_PRECONDITION, and so is a missing or unusable seal key (seal.pem); an
unreadable directory file → UNAVAILABLE (fail closed). Each of them is an audit
event. Allowed reads are audited before the first byte is served; a recording that
does not exist answers NOT_FOUND before the rules are asked (ids are 128 random
bits, so this tells nobody anything).

Beside it: who asks and the grant (``caller.py``), the privacy officer's RPCs
(``officer.py``), the web's (``web.py``, ``waveform.py``) and the catalog queries
(``queries.py``); they all go through this gate.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any, NoReturn

import grpc

from agent import logs
from agent.config import StoreConfig
from agent.directory import Directory, DirectoryError
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.access import identity, officer, tokens
from agent.store.access import queries as q
from agent.store.access import web as access_web
from agent.store.access.caller import PURPOSES, Attempt, Caller, DirectoryFile, Grant
from agent.store.access.rules import (
    OFFICER_OPERATIONS,
    Operation,
    RecordingFacts,
    Verdict,
    decide,
    scope_of,
    scrub,
)
from agent.store.access.trail import UnauthenticatedTrail
from agent.store.access.waveform import Waveforms, waveform
from agent.store.archive.vault import Vault
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, RecordingRow, now_ms
from agent.store.monitoring import ACCESS_REQUESTS
from agent.store.retention.sweeper import Sweeper
from agent.store.rpc_errors import bounded_id, status_of

log = logs.get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
_ID = re.compile(r"[0-9a-f]{32}")
MAX_TOKEN_CHARS = 200  # a token is 66 characters; a longer header is not read
MAX_ID_TOKEN_CHARS = 16 * 1024  # an OpenID ID token (a signed JWT) is 1-2 kB
# The request being served, as far as it is known (for the audit of an internal error).
_ATTEMPT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "callrec_access_attempt", default=None
)
MAX_PACKAGE = 200
# Initial metadata of Play, Export and ExportPackage: the bytes to come (a progress line).
TOTAL_BYTES = "callrec-total-bytes"


_OUTCOMES = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "denied",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.OUT_OF_RANGE: "out_of_range",
}


class AccessService(apb_grpc.AccessServicer):
    def __init__(
        self,
        config: StoreConfig,
        catalog: Catalog,
        vault: Vault,
        today: Callable[[], dt.date] = q.today_utc,
    ) -> None:
        if config.directory_file is None:
            raise ValueError("[store] directory_file is required for the Access service")
        self.config = config
        self.catalog = catalog
        self.vault = vault
        self.waveforms = Waveforms()
        self.today = today
        self.directory = DirectoryFile(config.directory_file)
        self.sweeper = Sweeper.from_config(config, catalog, vault)
        self.trail = UnauthenticatedTrail(self._audit)
        self.oidc = identity.OidcVerifier(config.oidc) if config.oidc else None

    # ------------------------------------------------------------ gate and audit

    def _identify(self, metadata: tuple[tuple[str, str | bytes], ...]) -> Caller:
        header = next((str(v) for k, v in metadata if k == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Caller("anonymous", None, "no 'authorization: Bearer <token>' metadata")
        token = token.strip()
        if self.oidc is not None and identity.looks_like_jwt(token):
            if len(token) > MAX_ID_TOKEN_CHARS:
                return Caller("anonymous", None, "malformed token", "web")
            return self._web_person(self.oidc.verify(token))
        if len(token) > MAX_TOKEN_CHARS:
            return Caller("anonymous", None, "malformed token")
        checked = tokens.check(self.catalog, token)
        actor = (
            f"person:{checked.person_id}"
            if checked.person_id
            else f"token:{checked.token_id}"
            if checked.token_id
            else "anonymous"
        )
        if checked.problem:
            return Caller(actor, None, checked.problem)
        assert checked.person_id is not None
        person = self.directory.current().people.get(checked.person_id)
        if person is None:
            return Caller(actor, None, "person is not in the directory")
        return Caller(actor, person)

    def _web_person(self, found: identity.Identity) -> Caller:
        if found.person_id is None:
            return Caller("anonymous", None, found.problem, "web")
        person = self.directory.current().people.get(found.person_id)
        actor = f"person:{found.person_id}"
        if person is None:
            return Caller(actor, None, "person is not in the directory", "web")
        return Caller(actor, person, channel="web")

    async def _audit(self, event: audit.Event) -> None:
        def write() -> None:
            with self.catalog.engine.begin() as conn:
                audit.append_event(conn, event)

        await asyncio.to_thread(write)

    async def _refuse(
        self, context: Context, attempt: Attempt, code: grpc.StatusCode, message: str
    ) -> NoReturn:
        """Audit a refusal, log it, abort the call with ``code``. Unauthenticated
        failures are aggregated per source (``access_trail``)."""
        outcome = _OUTCOMES.get(code, "refused")
        detail = scrub(message, 400)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            record, source = await self.trail.admit(context.peer(), attempt.actor)
            if not record:
                await context.abort(code, message)
                raise AssertionError("unreachable")
            detail = scrub(f"{message}; source={source}", 400)
        await self._audit(attempt.event(outcome, detail))
        ACCESS_REQUESTS.labels(attempt.role, attempt.op.value, outcome).inc()
        log.info(
            "access_refused",
            actor=attempt.actor,
            action=attempt.op.value,
            recording_id=attempt.recording_id or "-",
            outcome=outcome,
            why=detail,
        )
        await context.abort(code, message)
        raise AssertionError("unreachable")

    async def flush(self) -> None:
        """Write the counts of unauthenticated failures still held (the store stops)."""
        await self.trail.flush()

    async def failed(self, context: Context, exc: Exception, method: str) -> None:
        """An unexpected failure: audited as ``error`` (with the request as far as it is
        known), logged with a reference, answered with a generic message."""
        failure = status_of(exc)
        attempt = _ATTEMPT.get()
        detail = f"{type(exc).__name__} ref={failure.ref}"
        try:
            if attempt is not None:
                await self._audit(attempt.event(failure.outcome, detail))
            else:
                op = method.rpartition("/")[2].lower()
                event = audit.Event("anonymous", op, None, "", failure.outcome, "", detail)
                await self._audit(event)
        except Exception as audit_exc:  # noqa: BLE001 - the catalog may be what failed
            log.error("access_audit_failed", ref=failure.ref, error=type(audit_exc).__name__)
        log.error(
            "access_failed",
            method=method,
            actor=attempt.actor if attempt else "anonymous",
            recording_id=attempt.recording_id if attempt else None,
            code=failure.code.name,
            ref=failure.ref,
            error=f"{type(exc).__name__}: {str(exc)[:300]}",
        )
        await context.abort(failure.code, failure.client_message)

    async def _invalid(self, context: Context, attempt: Attempt, message: str) -> NoReturn:
        await self._refuse(context, attempt, grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _unready(self, context: Context, attempt: Attempt, message: str) -> NoReturn:
        """The store lacks what the request needs (a key file): FAILED_PRECONDITION."""
        await self._refuse(context, attempt, grpc.StatusCode.FAILED_PRECONDITION, message)

    async def _caller(self, context: Context, attempt: Attempt) -> tuple[Caller, Directory]:
        await self.trail.flush_due()
        metadata = tuple((str(k), v) for k, v in context.invocation_metadata() or ())
        try:
            caller = await asyncio.to_thread(self._identify, metadata)
            return caller, self.directory.current()
        except DirectoryError as exc:
            log.error("access_directory_unreadable", reason=str(exc))
            unavailable = grpc.StatusCode.UNAVAILABLE
            await self._refuse(context, attempt, unavailable, "the directory cannot be read")

    async def _gate(
        self, context: Context, op: Operation, request: Any, recording_id: str | None = None
    ) -> Grant:
        """Authenticate, validate, authorise — auditing every refusal — or abort. A
        recording id that is not one is never written anywhere (audit: none)."""
        well_formed = recording_id if recording_id and _ID.fullmatch(recording_id) else None
        attempt = Attempt("anonymous", op, well_formed)
        _ATTEMPT.set(attempt)
        caller, directory = await self._caller(context, attempt)
        attempt = replace(attempt, actor=caller.actor, channel=caller.channel)
        _ATTEMPT.set(attempt)
        if caller.person is None:
            unauthenticated = grpc.StatusCode.UNAUTHENTICATED
            message = f"authentication failed: {caller.problem}"
            await self._refuse(context, attempt, unauthenticated, message)
        attempt = replace(attempt, reason=scrub(request.reason), role=caller.person.role.value)
        purpose = PURPOSES.get(request.purpose)
        if purpose is None:
            await self._invalid(
                context, attempt, "purpose: verification, legal, training or security"
            )
        attempt = replace(attempt, purpose=purpose.value)
        _ATTEMPT.set(attempt)
        if op in OFFICER_OPERATIONS and not attempt.reason:
            await self._invalid(context, attempt, "reason: say why (e.g. the request's case id)")
        row = None
        if recording_id is not None:
            row = await self._recording(context, replace(attempt, recording_id=None), recording_id)
        facts = RecordingFacts.of(row) if row is not None else None
        decision = decide(caller.person, op, purpose, facts, directory, self.today())
        if decision.verdict is not Verdict.ALLOW:
            denied = grpc.StatusCode.PERMISSION_DENIED
            await self._refuse(context, attempt, denied, decision.why)
        ACCESS_REQUESTS.labels(attempt.role, op.value, "allowed").inc()
        return Grant(attempt, caller.person, purpose, row, directory)

    async def _recording(
        self, context: Context, attempt: Attempt, recording_id: str | None = None
    ) -> RecordingRow:
        """The live recording the request names, or abort (INVALID_ARGUMENT, NOT_FOUND)."""
        rid = attempt.recording_id if recording_id is None else recording_id
        if rid is None or not _ID.fullmatch(rid):
            attempt = replace(attempt, recording_id=None)
            shown = bounded_id(scrub(rid or "", 100), 40)
            await self._invalid(
                context, attempt, f"recording_id {shown!r}: expected 32 lower-case hex digits"
            )
        attempt = replace(attempt, recording_id=rid)
        row = await asyncio.to_thread(self.catalog.get, rid)
        if row is None or row.destroy_reason is not None:
            not_found = grpc.StatusCode.NOT_FOUND
            await self._refuse(context, attempt, not_found, f"no recording {rid}")
        return row

    # ------------------------------------------------------------ everyone

    async def WhoAmI(self, request: apb.WhoAmIRequest, context: Context) -> apb.PersonView:
        return await access_web.who_am_i(self, context)

    async def Search(self, request: apb.SearchRequest, context: Context) -> apb.SearchResponse:
        grant = await self._gate(context, Operation.SEARCH, request)
        filters = q.Filters(
            since_ms=request.since.ToMilliseconds() if request.HasField("since") else None,
            until_ms=request.until.ToMilliseconds() if request.HasField("until") else None,
            employee_id=request.employee_id,
            team=request.team,
            service_number=request.service_number,
            customer_masked=request.customer_masked.replace(" ", ""),
            flags=tuple(request.flags),
            direction=request.direction,
        )
        limit = request.limit if 0 < request.limit <= 1000 else 100
        scope = scope_of(grant.person, grant.directory)
        rows, more = await asyncio.to_thread(q.search, self.catalog, filters, scope, limit)
        await self._audit(grant.event(None, f"results={len(rows)} filters={filters.names()}"))
        months = self.config.retention_months
        views = [q.view_of(r, months) for r in rows]
        return apb.SearchResponse(recordings=views, truncated=more)

    async def GetRecording(
        self, request: apb.RecordingRequest, context: Context
    ) -> apb.RecordingView:
        grant = await self._gate(context, Operation.GET, request, request.recording_id)
        row = grant.recording
        await self._audit(grant.event(row.recording_id))
        if grant.attempt.channel == "web":  # the recording's page: its player comes next
            self.waveforms.warm(self.vault, row)
        return q.view_of(row, self.config.retention_months)

    async def Play(
        self, request: apb.RecordingRequest, context: Context
    ) -> AsyncIterator[pb.AudioChunk]:
        async for chunk in self._audio(Operation.PLAY, request, context):
            yield chunk

    async def Export(
        self, request: apb.RecordingRequest, context: Context
    ) -> AsyncIterator[pb.AudioChunk]:
        async for chunk in self._audio(Operation.EXPORT, request, context):
            yield chunk

    async def _audio(
        self, op: Operation, request: apb.RecordingRequest, context: Context
    ) -> AsyncIterator[pb.AudioChunk]:
        grant = await self._gate(context, op, request, request.recording_id)
        row = grant.recording
        audio = await self._opened(row, grant.event(row.recording_id, f"bytes={row.size}"))
        await context.send_initial_metadata(((TOTAL_BYTES, str(row.size)),))  # for progress
        first = True
        async for data in audio:
            yield pb.AudioChunk(data=data, audio_format=row.audio_format if first else "")
            first = False

    async def _opened(
        self, row: RecordingRow, allowed: audit.Event, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The recording's plaintext (or ``length`` bytes of it from ``offset``), once its
        key has opened and its first chunk has decrypted; only then is ``allowed`` audited
        (a failure before that is audited as ``error`` by ``failed``, never as allowed)."""
        chunks: Iterator[bytes] = self.vault.read(row.recording_id, row.blob_key, offset, length)
        first = await asyncio.to_thread(next, chunks, b"")
        await self._audit(allowed)
        return _rest(first, chunks)

    async def PlayRange(
        self, request: apb.RangeRequest, context: Context
    ) -> AsyncIterator[apb.RangeChunk]:
        async for chunk in access_web.play_range(self, request, context):
            yield chunk

    async def Waveform(self, request: apb.RecordingRequest, context: Context) -> apb.WaveformView:
        return await waveform(self, request, context)

    # ------------------------------------------------------------ privacy officer

    async def FindByNumber(
        self, request: apb.FindByNumberRequest, context: Context
    ) -> apb.SearchResponse:
        return await officer.find_by_number(self, request, context)

    async def ExportPackage(
        self, request: apb.PackageRequest, context: Context
    ) -> AsyncIterator[apb.PackageChunk]:
        grant = await self._gate(context, Operation.EXPORT_PACKAGE, request)
        ids = list(dict.fromkeys(request.recording_ids))
        if not 0 < len(ids) <= MAX_PACKAGE:
            await self._invalid(context, grant.attempt, f"recording_ids: 1..{MAX_PACKAGE}")
        rows = [await self._recording(context, grant.attempt, rid) for rid in ids]
        for row in rows:  # every key opens before anything is audited as allowed
            await asyncio.to_thread(self.vault.data_key, row.recording_id, row.blob_key)
        for row in rows:
            await self._audit(grant.event(row.recording_id, f"package_of={len(rows)}"))
        await context.send_initial_metadata(((TOTAL_BYTES, str(sum(r.size for r in rows))),))
        yield apb.PackageChunk(metadata_json=q.package_metadata(rows, now_ms()))
        for row in rows:
            name, first = q.audio_name(row), True
            chunks = self.vault.read(row.recording_id, row.blob_key)
            async for data in _rest(await asyncio.to_thread(next, chunks, b""), chunks):
                fmt = row.audio_format if first else ""
                yield apb.PackageChunk(file=apb.PackageFile(name=name, data=data, audio_format=fmt))
                first = False

    async def Erase(self, request: apb.RecordingRequest, context: Context) -> apb.ChangeResult:
        return await officer.erase(self, request, context)

    async def Restrict(self, request: apb.RecordingRequest, context: Context) -> apb.ChangeResult:
        return await officer.set_state(
            self, context, request, Operation.RESTRICT, "restricted", True
        )

    async def Unrestrict(self, request: apb.RecordingRequest, context: Context) -> apb.ChangeResult:
        return await officer.set_state(
            self, context, request, Operation.UNRESTRICT, "restricted", False
        )

    async def Hold(self, request: apb.RecordingRequest, context: Context) -> apb.ChangeResult:
        return await officer.set_state(self, context, request, Operation.HOLD, "legal_hold", True)

    async def Release(self, request: apb.RecordingRequest, context: Context) -> apb.ChangeResult:
        return await officer.set_state(
            self, context, request, Operation.RELEASE, "legal_hold", False
        )

    async def RectifyEmployee(
        self, request: apb.RectifyRequest, context: Context
    ) -> apb.ChangeResult:
        return await officer.rectify_employee(self, request, context)

    async def OpenSealedDigits(
        self, request: apb.RecordingRequest, context: Context
    ) -> apb.SealedDigits:
        return await officer.open_sealed_digits(self, request, context)

    async def AuditLog(self, request: apb.AuditRequest, context: Context) -> apb.AuditResponse:
        return await access_web.audit_log(self, request, context)


async def _rest(first: bytes, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    data = first
    while data:
        yield data
        data = await asyncio.to_thread(next, chunks, b"")


def add_access_service(
    server: grpc.aio.Server, config: StoreConfig, catalog: Catalog, vault: Vault
) -> AccessService | None:
    """Serve Access beside Ingest when ``[store] directory_file`` is set."""
    if config.directory_file is None:
        log.warning("access_disabled", reason="no_directory_file")
        return None
    service = AccessService(config, catalog, vault)
    apb_grpc.add_AccessServicer_to_server(service, server)
    log.info("access_enabled", directory=config.directory_file)
    return service
