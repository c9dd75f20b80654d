"""The audit view (privacy officer, admins): who accessed recording X, what person Y
accessed, in a period; newest first, paged; CSV export; the chain's verification and
head hash. Everything comes from the store's AuditLog, which audits the reading too."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from starlette.requests import Request
from starlette.responses import Response

from agent.pb.callrec.v1 import access_pb2 as apb
from agent.web import timefmt
from agent.web.pages import EMPLOYEE, RID, signed_in
from agent.web.render import message, page
from agent.web.signin.auth import bearer

PURPOSE = {"privacy_officer": apb.PURPOSE_LEGAL, "admin": apb.PURPOSE_SECURITY}
COLUMNS = ("seq", "at", "actor", "action", "recording_id", "purpose", "reason", "outcome",
           "detail", "channel")  # fmt: skip


def _request(request: Request, limit: int) -> tuple[apb.AuditRequest, dict[str, str], list[str]]:
    q, zone = request.query_params, ZoneInfo(request.app.state.config.time_zone)
    values = {k: q.get(k, "").strip()[:64] for k in ("recording", "person", "since", "until")}
    values["before"] = q.get("before", "") if q.get("before", "").isdigit() else ""
    errors = [k for k, rx in (("recording", RID), ("person", EMPLOYEE))
              if values[k] and not rx.match(values[k])]  # fmt: skip
    role = request.session["person"]["role"]
    audit = apb.AuditRequest(
        purpose=PURPOSE.get(role, apb.PURPOSE_SECURITY), limit=limit,
        recording_id="" if "recording" in errors else values["recording"],
        person_id="" if "person" in errors else values["person"],
        before_seq=int(values["before"] or 0), verify=q.get("verify") == "1",
    )  # fmt: skip
    for key, end in (("since", False), ("until", True)):
        try:
            moment = timefmt.parse_local(values[key], zone, end_of_day=end)
        except timefmt.TimeInputError:
            errors.append(key)
            continue
        if moment is not None:
            getattr(audit, key).FromDatetime(moment.astimezone(dt.UTC))
    return audit, values, errors


def channel_of(entry: apb.AuditEntry) -> str:
    """web / cli (the Access service writes it first in the detail), console (the
    store host's console names itself in the actor), or "" (the store itself)."""
    if entry.detail.startswith("channel="):
        return entry.detail.split(" ", 1)[0].split(";", 1)[0].removeprefix("channel=")
    return "console" if entry.actor.startswith("console") else ""


def _rows(answer: apb.AuditResponse, zone: ZoneInfo) -> list[dict[str, Any]]:
    return [
        {
            "seq": e.seq,
            "at": timefmt.show(e.at.ToDatetime(dt.UTC), zone),
            "actor": e.actor,
            "action": e.action,
            "recording_id": e.recording_id,
            "purpose": e.purpose,
            "reason": e.reason,
            "outcome": e.outcome,
            "detail": e.detail,
            "channel": channel_of(e),
        }
        for e in answer.entries
    ]


@signed_in
async def audit(request: Request) -> Response:
    if request.session["person"]["role"] not in PURPOSE:
        return message(request, 403, "no_access", "audit_only")
    query, values, errors = _request(request, 50)
    if errors:
        return page(request, "audit.html", 400, values=values, errors=errors, rows=[], answer=None)
    answer = await request.app.state.store.unary(await bearer(request), "AuditLog", query)
    rows = _rows(answer, ZoneInfo(request.app.state.config.time_zone))
    filters = {k: v for k, v in values.items() if v and k != "before"}
    next_url = ""
    if answer.truncated and rows:
        next_url = "/audit?" + urlencode({**filters, "before": rows[-1]["seq"]})
    return page(
        request, "audit.html", values=values, errors=[], rows=rows, answer=answer,
        verify=query.verify, next_url=next_url, csv_url="/audit.csv?" + urlencode(filters),
    )  # fmt: skip


@signed_in
async def audit_csv(request: Request) -> Response:
    if request.session["person"]["role"] not in PURPOSE:
        return message(request, 403, "no_access", "audit_only")
    query, _, errors = _request(request, 1000)
    if errors:
        return message(request, 400, "bad_request", "bad_request")
    answer = await request.app.state.store.unary(await bearer(request), "AuditLog", query)
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS)
    writer.writeheader()
    for row in _rows(answer, ZoneInfo(request.app.state.config.time_zone)):
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return Response(
        out.getvalue(),
        headers={
            "content-type": "text/csv; charset=utf-8",
            "content-disposition": 'attachment; filename="callrec-audit.csv"',
            "cache-control": "no-store",
        },
    )


def _cell(value: object) -> object:
    """No spreadsheet formulas from the log's text fields."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not isinstance(value, int) else value
