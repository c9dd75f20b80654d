"""The Access RPCs the people's web needs, beside the CLI's: who a token names
(WhoAmI, at sign-in), part of a recording's audio (PlayRange, for HTTP Range
requests), and the audit log (AuditLog). The service (``access_service.py``) keeps
the gate and the audit; these functions use them, so authentication, the rules and
the audit of every request are the same as for every other RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc

from agent.pb.callrec.v1 import access_pb2 as apb
from agent.store.access.caller import Attempt
from agent.store.access.rules import Operation, trained
from agent.store.audit import chain as audit
from agent.store.audit import queries as audit_queries

if TYPE_CHECKING:
    from agent.store.access.service import AccessService, Context

MAX_RANGE = 8 * 1024 * 1024  # bytes one PlayRange serves


async def who_am_i(service: AccessService, context: Context) -> apb.PersonView:
    attempt = Attempt("anonymous", Operation.SIGN_IN, None)
    caller, _ = await service._caller(context, attempt)
    attempt = replace(attempt, actor=caller.actor, channel=caller.channel)
    if caller.person is None:
        message = f"authentication failed: {caller.problem}"
        await service._refuse(context, attempt, grpc.StatusCode.UNAUTHENTICATED, message)
    person, ok = caller.person, trained(caller.person, service.today())
    await service._audit(attempt.event("allowed" if ok else "denied", f"trained={ok}"))
    return apb.PersonView(
        id=person.id, name=person.name, role=person.role.value, team=person.team or "",
        trained=ok,
    )  # fmt: skip


async def play_range(
    service: AccessService, request: apb.RangeRequest, context: Context
) -> AsyncIterator[apb.RangeChunk]:
    """Bytes ``offset..offset+length`` of the plaintext (at most MAX_RANGE), audited as
    a play; the vault decrypts only the chunks that hold them."""
    grant = await service._gate(context, Operation.PLAY, request, request.recording_id)
    row = grant.row
    assert row is not None
    offset, length = request.offset, min(request.length or MAX_RANGE, MAX_RANGE)
    if not 0 <= offset < row.size or length < 0:
        await service._refuse(
            context, grant.attempt, grpc.StatusCode.OUT_OF_RANGE,
            f"offset: 0..{row.size - 1}, length: 0..{MAX_RANGE}",
        )  # fmt: skip
    length = min(length, row.size - offset)
    allowed = grant.event(row.recording_id, f"bytes={offset}-{offset + length - 1}")
    audio = await service._opened(row, allowed, offset, length)
    first = True
    async for data in audio:
        yield apb.RangeChunk(
            data=data, total_size=row.size if first else 0,
            audio_format=row.audio_format if first else "", offset=offset if first else 0,
        )  # fmt: skip
        first = False


async def audit_log(
    service: AccessService, request: apb.AuditRequest, context: Context
) -> apb.AuditResponse:
    grant = await service._gate(context, Operation.AUDIT_VIEW, request)
    wanted = audit_queries.AuditFilter(
        recording_id=request.recording_id,
        actor=f"person:{request.person_id}" if request.person_id else "",
        since_ms=request.since.ToMilliseconds() if request.HasField("since") else None,
        until_ms=request.until.ToMilliseconds() if request.HasField("until") else None,
        before_seq=request.before_seq,
    )
    limit = request.limit if 0 < request.limit <= 1000 else 100
    rows, more = await asyncio.to_thread(audit_queries.read, service.catalog, wanted, limit)
    asked = ",".join(k for k, v in vars(wanted).items() if v not in ("", None, 0)) or "none"
    detail = f"entries={len(rows)} filters={asked} verify={request.verify}"
    await service._audit(grant.event(request.recording_id or None, detail))
    answer = apb.AuditResponse(entries=[_entry(r) for r in rows], truncated=more)
    answer.head_seq, answer.head_hash = await asyncio.to_thread(audit_queries.head, service.catalog)
    if request.verify:
        verdict = await asyncio.to_thread(audit.verify, service.catalog)
        answer.verified, answer.chain_problem = verdict.ok, verdict.problem
    return answer


def _entry(row: dict[str, Any]) -> apb.AuditEntry:
    entry = apb.AuditEntry(
        seq=row["seq"], actor=row["actor"], action=row["action"],
        recording_id=row["recording_id"] or "", purpose=row["purpose"], reason=row["reason"],
        outcome=row["outcome"], detail=row["detail"],
    )  # fmt: skip
    entry.at.FromMilliseconds(row["at_ms"])
    return entry
