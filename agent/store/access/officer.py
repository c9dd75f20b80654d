"""The privacy officer's RPCs of the Access service (data-subject requests): find a
customer's calls by number, erase, restrict, hold, rectify the employee, open the
sealed last digits. The service (``service.py``) keeps the gate and the audit; these
functions use them, so authentication, the rules and the audit are the same as for
every other RPC."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from agent import logs
from agent.config import StoreConfig
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.privacy import KeyFileError, normalise
from agent.store.access import queries as q
from agent.store.access.rules import Operation
from agent.store.keys.numbers import SealError, SealKeyring, TooManyCandidates, find_calls
from agent.store.retention.sweeper import RecordingHeld

if TYPE_CHECKING:
    from agent.store.access.service import AccessService, Context

log = logs.get_logger(__name__)


async def find_by_number(
    service: AccessService, request: apb.FindByNumberRequest, context: Context
) -> apb.SearchResponse:
    """The calls of a customer's number near a time: the store opens the sealed last
    digits of the candidates with seal.pem, in memory; every match is audited."""
    grant = await service._gate(context, Operation.FIND_BY_NUMBER, request)
    number = normalise(request.number, (request.region or "FI").upper())
    if number.e164 is None:
        await service._invalid(
            context, grant.attempt, f"number: not a phone number ({number.kind})"
        )
    window = request.window_minutes or 15
    if not request.HasField("at") or not 1 <= window <= 1440:
        await service._invalid(context, grant.attempt, "at: required; window_minutes: 1..1440")
    try:
        keyring = await asyncio.to_thread(seal_keyring, service.config)
    except KeyFileError as exc:
        log.error("access_seal_key_unusable", reason=str(exc))
        await service._unready(context, grant.attempt, "the store cannot use its seal key")
    at_ms, window_ms, e164 = request.at.ToMilliseconds(), window * 60_000, number.e164
    try:
        found = await asyncio.to_thread(
            find_calls, service.catalog, keyring, e164, at_ms, window_ms
        )
    except TooManyCandidates as exc:
        await service._invalid(context, grant.attempt, f"window_minutes: {exc}; narrow it")
    detail = f"matches={len(found.rows)} opened={found.candidates} window=+-{window}m"
    ids: list[str | None] = [r.recording_id for r in found.rows]
    for rid in ids or [None]:
        await service._audit(grant.event(rid, detail))
    months = service.config.retention_months
    return apb.SearchResponse(recordings=[q.view_of(r, months) for r in found.rows])


def seal_keyring(config: StoreConfig) -> SealKeyring:
    if config.seal_key_file is None:
        raise KeyFileError("[store] seal_key_file is not set")
    return SealKeyring.load(config.seal_key_file)


async def erase(
    service: AccessService, request: apb.RecordingRequest, context: Context
) -> apb.ChangeResult:
    """Crypto-shred a recording now (not one on legal hold)."""
    grant = await service._gate(context, Operation.ERASE, request, request.recording_id)
    rid = grant.recording.recording_id
    held = grpc.StatusCode.FAILED_PRECONDITION, f"{rid} is on legal hold: release it first"
    if grant.recording.legal_hold:
        await service._refuse(context, grant.attempt, *held)
    await service._audit(grant.event(rid, "crypto-shred key, delete blob and row"))
    try:
        done = await asyncio.to_thread(service.sweeper.destroy, rid, "erasure", grant.actor)
    except RecordingHeld:
        await service._refuse(context, grant.attempt, *held)
    log.info("recording_erased", recording_id=rid, actor=grant.actor)
    return apb.ChangeResult(recording_id=rid, changed=done)


async def set_state(
    service: AccessService,
    context: Context,
    request: apb.RecordingRequest,
    op: Operation,
    column: str,
    on: bool,
) -> apb.ChangeResult:
    """Restrict/unrestrict, hold/release: one column, written with its audit event."""
    grant = await service._gate(context, op, request, request.recording_id)
    rid = grant.recording.recording_id
    event = grant.event(rid)
    changed = await asyncio.to_thread(q.set_state, service.catalog, rid, column, on, event)
    log.info(f"recording_{op.value}", recording_id=rid, actor=grant.actor, changed=changed)
    return apb.ChangeResult(recording_id=rid, changed=changed)


async def rectify_employee(
    service: AccessService, request: apb.RectifyRequest, context: Context
) -> apb.ChangeResult:
    """Name the right employee of a recording (the wrong one is replaced)."""
    grant = await service._gate(context, Operation.RECTIFY, request, request.recording_id)
    row = grant.recording
    person = grant.directory.people.get(request.to_employee_id)
    if person is None:
        await service._invalid(context, grant.attempt, "to_employee_id: not in the directory")
    wrong = request.from_employee_id or row.employee_id
    event = grant.event(row.recording_id)
    try:
        changed = await asyncio.to_thread(
            q.rectify, service.catalog, row.recording_id, wrong, person, event
        )
    except q.RectifyError as exc:
        await service._invalid(context, grant.attempt, str(exc))
    log.info("recording_rectified", recording_id=row.recording_id, actor=grant.actor)
    return apb.ChangeResult(recording_id=row.recording_id, changed=changed)


async def open_sealed_digits(
    service: AccessService, request: apb.RecordingRequest, context: Context
) -> apb.SealedDigits:
    """The customer's last digits, opened with seal.pem for the privacy officer."""
    grant = await service._gate(context, Operation.UNSEAL, request, request.recording_id)
    row = grant.recording
    sealed = row.customer_tail_sealed
    if not sealed:
        await service._invalid(context, grant.attempt, f"no sealed digits ({row.customer_kind})")
    try:
        keyring = await asyncio.to_thread(seal_keyring, service.config)
        digits = await asyncio.to_thread(keyring.open, sealed)
    except (KeyFileError, SealError) as exc:
        log.error("unseal_failed", recording_id=row.recording_id, reason=str(exc))
        await service._unready(context, grant.attempt, "the store's seal key does not open them")
    await service._audit(grant.event(row.recording_id))
    return apb.SealedDigits(
        recording_id=row.recording_id, customer_masked=row.customer_masked, last_digits=digits
    )
