"""Search and the recording page. Each request goes to the store as the signed-in
person; what the store refuses becomes a clear page (and the store audits it)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from agent import logs
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.web import timefmt
from agent.web.i18n import FLAGS, flag_words
from agent.web.render import language, message, page
from agent.web.signin.auth import bearer
from agent.web.signin.sessions import csrf_ok
from agent.web.store_client import BROWSE_PURPOSE, PURPOSES, StoreRefused

log = logs.get_logger(__name__)
RID = re.compile(r"^[0-9a-f]{32}$")
MASKED = re.compile(r"^\+?[0-9 ]{4,20}\*{3}$")
SERVICE = re.compile(r"^\+[0-9 ]{4,20}$")
EMPLOYEE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
Handler = Callable[[Request], Awaitable[Response]]
ROLE_PURPOSES = {
    "agent": ("verification", "training"),
    "supervisor": ("verification", "training", "legal"),
    "admin": ("security",),
    "privacy_officer": ("legal",),
}


def signed_in(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        if not request.session.get("person"):
            return RedirectResponse("/", 303)
        try:
            return await handler(request)
        except StoreRefused as exc:
            return refused(request, exc)

    return wrapped


def refused(request: Request, exc: StoreRefused) -> Response:
    if exc.code is grpc.StatusCode.UNAUTHENTICATED:
        request.session.clear()
        if "expired" in exc.message and request.method == "GET":
            # The ID token outlived itself (the provider's lifetime, often an hour):
            # sign in again; with a live session at the provider this is one redirect.
            return RedirectResponse("/signin", 303)
        return message(request, 401, "no_access", "session_over")
    if exc.code is grpc.StatusCode.PERMISSION_DENIED:
        return message(request, 403, "not_found", "not_found_text")
    if exc.code is grpc.StatusCode.NOT_FOUND:
        return message(request, 404, "not_found", "not_found_text")
    if exc.code is grpc.StatusCode.FAILED_PRECONDITION and "legal hold" in exc.message:
        return message(request, 409, "erase", "held_first")
    if exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return message(request, 400, "bad_request", "bad_request")
    # The store (or the way to it) failed: the person gets a page that says so; the
    # operator gets the code and the store's words (no customer data: no number is
    # ever sent to the store in a way that lands in a status message).
    log.warning(
        "store_unavailable", code=exc.code.name, path=request.url.path, why=exc.message[:200]
    )
    return message(request, 503, "no_access", "unavailable")


def _zone(request: Request) -> ZoneInfo:
    return ZoneInfo(request.app.state.config.time_zone)


def _stamp(moment: dt.datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _form(request: Request, q: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The search form's values and the names of the fields that are wrong. A wrong
    customer field is not shown back (it may hold a full number)."""
    keys = ("since", "until", "employee", "customer", "team", "service")
    values = {k: q.get(k, "").strip()[:64] for k in keys}
    values["direction"] = (
        q.get("direction", "") if q.get("direction") in ("inbound", "outbound") else ""
    )
    values["flag"] = q.get("flag", "") if q.get("flag", "") in FLAGS else ""
    values["before"] = q.get("before", "") if q.get("before", "").isdigit() else ""
    errors = []
    for key in ("since", "until"):
        try:
            timefmt.parse_local(values[key], _zone(request))
        except timefmt.TimeInputError:
            errors.append(key)
    if values["employee"] and not EMPLOYEE.match(values["employee"]):
        errors.append("employee")
    if values["customer"] and not MASKED.match(values["customer"]):
        errors.append("customer")
        values["customer"] = ""
    if values["team"] and not EMPLOYEE.match(values["team"]):
        errors.append("team")
    if values["service"] and not SERVICE.match(values["service"]):
        errors.append("service")
    return values, errors


def _search_request(request: Request, values: dict[str, str], role: str) -> apb.SearchRequest:
    zone, size = _zone(request), request.app.state.config.page_size
    search = apb.SearchRequest(
        purpose=PURPOSES[BROWSE_PURPOSE[role]], limit=size, employee_id=values["employee"],
        customer_masked=values["customer"].replace(" ", ""), direction=values["direction"],
        flags=[values["flag"]] if values["flag"] else [], team=values["team"],
        service_number=values["service"].replace(" ", ""),
    )  # fmt: skip
    if since := _stamp(timefmt.parse_local(values["since"], zone)):
        search.since.CopyFrom(since)
    until = timefmt.parse_local(values["until"], zone, end_of_day=True)
    if values["before"]:
        before = dt.datetime.fromtimestamp(int(values["before"]) / 1000, dt.UTC)
        until = min(until, before) if until else before
    if stamp := _stamp(until):
        search.until.CopyFrom(stamp)
    return search


@signed_in
async def search(request: Request) -> Response:
    """GET: the results (the URL holds only valid, masked values). POST: the form,
    checked first, so that whatever was typed (a full number in the customer field)
    never lands in a URL, a browser history or a proxy's log."""
    person = request.session["person"]
    if request.method == "POST":
        form = await request.form(max_files=0, max_fields=20)
        if not csrf_ok(request.session, str(form.get("csrf", ""))):
            return message(request, 403, "no_access", "csrf")
        values, errors = _form(request, form)
        if not errors:
            return RedirectResponse(
                "/search?" + urlencode({k: v for k, v in values.items() if v}), 303
            )
    else:
        values, errors = _form(request, request.query_params)
    rows: list[dict[str, Any]] = []
    more = False
    if not errors:
        token = await bearer(request)
        found = await request.app.state.store.search(
            token, _search_request(request, values, person["role"])
        )
        rows = [summary(v, _zone(request), language(request)) for v in found.recordings]
        more = found.truncated
    next_url = ""
    if more and rows:
        last_ms = found.recordings[-1].info.manifest.started_at.ToMilliseconds()
        next_url = "/search?" + urlencode({**values, "before": str(last_ms)})
    lang = language(request)
    flags = [(f, words[lang]) for f, words in FLAGS.items()]
    return page(
        request, "search.html", 400 if errors else 200, values=values, errors=errors,
        rows=rows, next_url=next_url, paged=bool(values["before"]), flags=flags,
    )  # fmt: skip


def summary(view: apb.RecordingView, zone: ZoneInfo, lang: str) -> dict[str, Any]:
    m = view.info.manifest
    return {
        "id": m.recording_id,
        "started": timefmt.show(m.started_at.ToDatetime(dt.UTC), zone),
        "duration": timefmt.duration(view.info.duration_ms),
        "customer": m.customer.masked,
        "service_number": m.service_number,
        "employees": ", ".join(e.name for e in m.employees),
        "direction": "inbound" if m.direction == pb.DIRECTION_INBOUND else "outbound",
        "flags": flag_words(list(m.flags), lang),
        "restricted": view.restricted,
        "legal_hold": view.legal_hold,
    }


def details(view: apb.RecordingView, zone: ZoneInfo, lang: str) -> dict[str, Any]:
    row = summary(view, zone, lang)
    joined = list(view.joined_at)
    row["people"] = [
        {
            "name": e.name,
            "team": e.team,
            "joined": timefmt.show(joined[i].ToDatetime(dt.UTC), zone)
            if i < len(joined) and joined[i].seconds
            else "",
        }
        for i, e in enumerate(view.info.manifest.employees)
    ]
    row["pauses"] = pause_marks(view.info.manifest)
    # Marked intervals on the waveform (player.js): the recording's pauses.
    row["marks"] = [
        {"start_s": p["start_s"], "end_s": p["end_s"], "label": f"{p['label']} ({p['who']})"}
        for p in row["pauses"]
    ]
    row["destroy_after"] = (
        timefmt.show_date(view.destroy_after.ToDatetime(dt.UTC), zone)
        if view.HasField("destroy_after")
        else ""
    )
    return row


def pause_marks(m: pb.Manifest) -> list[dict[str, Any]]:
    """The recording's pauses for the page: offsets as m:ss, who asked, and where they
    lie on the waveform (``x``, ``w`` in thousandths of the recording's length)."""
    start = m.started_at.ToMilliseconds()
    length = max(1, m.ended_at.ToMilliseconds() - start)
    marks = []
    for p in m.pauses:
        begin, end = p.start.ToMilliseconds() - start, p.end.ToMilliseconds() - start
        marks.append({
            "label": f"{timefmt.duration(begin)}-{timefmt.duration(end)}",
            "who": p.who,
            "start_s": begin / 1000,
            "end_s": end / 1000,
            "x": round(1000 * begin / length, 1),
            "w": round(max(2.0, 1000 * (end - begin) / length), 1),
        })  # fmt: skip
    return marks


@signed_in
async def recording(request: Request) -> Response:
    rid = request.path_params["rid"]
    if not RID.match(rid):
        return message(request, 404, "not_found", "not_found_text")
    person = request.session["person"]
    view = await request.app.state.store.recording(
        await bearer(request), rid, BROWSE_PURPOSE[person["role"]]
    )
    purpose = request.session.get("purposes", {}).get(rid, "")
    return page(
        request, "recording.html", rec=details(view, _zone(request), language(request)),
        purpose=purpose, purposes=ROLE_PURPOSES[person["role"]],
    )  # fmt: skip


@signed_in
async def choose_purpose(request: Request) -> Response:
    rid = request.path_params["rid"]
    form = await request.form()
    if not csrf_ok(request.session, str(form.get("csrf", ""))):
        return message(request, 403, "no_access", "csrf")
    purpose = str(form.get("purpose", ""))
    role = request.session["person"]["role"]
    if not RID.match(rid) or purpose not in ROLE_PURPOSES[role]:
        return message(request, 400, "bad_request", "bad_request")
    purposes = dict(request.session.get("purposes", {}))
    purposes[rid] = purpose
    request.session["purposes"] = dict(list(purposes.items())[-200:])
    return RedirectResponse(f"/recordings/{rid}", 303)
