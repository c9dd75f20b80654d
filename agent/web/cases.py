"""The privacy officer's data-subject requests as cases: find a customer's calls by
number and local time (the number is typed into a POST form, sent once to the store,
never put in a URL, a page or a log), then export the package, restrict or unrestrict,
hold or release, unseal the last digits, or erase after a confirmation that names what
will be destroyed. The case reference goes to the store as the reason of every step,
so the audit log ties them together."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import zipfile
from collections.abc import AsyncIterator
from typing import Any
from zoneinfo import ZoneInfo

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from agent import logs
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.web import timefmt
from agent.web.pages import RID, details, signed_in
from agent.web.render import language, message, page
from agent.web.signin.auth import bearer
from agent.web.signin.sessions import csrf_ok
from agent.web.store_client import StoreRefused

log = logs.get_logger(__name__)
LEGAL = apb.PURPOSE_LEGAL
CASE = re.compile(r"^[\w .:/#-]{3,64}$")
CHANGES = {
    "restrict": "Restrict",
    "unrestrict": "Unrestrict",
    "hold": "Hold",
    "release": "Release",
}
MAX_IDS = 200


def _officer(request: Request) -> bool:
    return bool(request.session["person"]["role"] == "privacy_officer")


async def _checked_form(request: Request) -> FormData | None:
    form = await request.form(max_files=0, max_fields=MAX_IDS + 20)
    return form if csrf_ok(request.session, str(form.get("csrf", ""))) else None


@signed_in
async def case_form(request: Request) -> Response:
    if not _officer(request):
        return message(request, 403, "no_access", "officer_only")
    return page(request, "case.html", case="", rows=None, values={}, errors=[])


def _find_request(form: FormData, zone: ZoneInfo) -> tuple[apb.FindByNumberRequest, list[str]]:
    errors = []
    case = str(form.get("case", "")).strip()
    if not CASE.match(case):
        errors.append("case")
    try:
        at = timefmt.parse_local(str(form.get("at", "")), zone)
    except timefmt.TimeInputError:
        at = None
    if at is None:
        errors.append("at")
    window = str(form.get("window", "15")).strip()
    if not window.isdigit() or not 1 <= int(window) <= 1440:
        errors.append("window")
    number = str(form.get("number", ""))[:40]
    if not any(ch.isdigit() for ch in number):
        errors.append("number")
    request = apb.FindByNumberRequest(
        purpose=LEGAL, reason=case, number=number, region="FI",
        window_minutes=int(window) if "window" not in errors else 15,
    )  # fmt: skip
    if at is not None:
        request.at.FromDatetime(at.astimezone(dt.UTC))
    return request, errors


@signed_in
async def find(request: Request) -> Response:
    form = await _checked_form(request)
    if form is None:
        return message(request, 403, "no_access", "csrf")
    zone = ZoneInfo(request.app.state.config.time_zone)
    find_request, errors = _find_request(form, zone)
    values = {"case": find_request.reason, "at": str(form.get("at", ""))[:40]}
    values["window"] = str(find_request.window_minutes)
    if errors:
        return page(request, "case.html", 400, case="", rows=None, values=values, errors=errors)
    try:
        found = await request.app.state.store.unary(
            await bearer(request), "FindByNumber", find_request
        )
    except StoreRefused as exc:
        if exc.message.startswith("number:"):
            return page(
                request, "case.html", 400, case="", rows=None, values=values, errors=["number"]
            )
        raise
    del find_request  # the number goes no further
    rows = [details(v, zone, language(request)) for v in found.recordings]
    return page(request, "case.html", case=values["case"], rows=rows, values=values, errors=[])


async def _views(request: Request, case: str, ids: list[str]) -> list[dict[str, Any]]:
    """The recordings still there, as the store shows them now."""
    zone, rows = ZoneInfo(request.app.state.config.time_zone), []
    for rid in ids:
        get = apb.RecordingRequest(purpose=LEGAL, reason=case, recording_id=rid)
        try:
            view = await request.app.state.store.unary(await bearer(request), "GetRecording", get)
        except StoreRefused:
            continue
        rows.append(details(view, zone, language(request)))
    return rows


@signed_in
async def act(request: Request) -> Response:
    form = await _checked_form(request)
    if form is None:
        return message(request, 403, "no_access", "csrf")
    case, action = str(form.get("case", "")).strip(), str(form.get("action", ""))
    ids = list(dict.fromkeys(str(i) for i in form.getlist("id")))[:MAX_IDS]
    if not CASE.match(case) or not ids or not all(RID.match(i) for i in ids):
        return message(request, 400, "bad_request", "choose_recordings")
    token, store = await bearer(request), request.app.state.store
    if action == "export":
        return await _export(request, case, ids)
    if action == "erase" and form.get("confirm") != "yes":
        rows = await _views(request, case, ids)
        return page(request, "erase.html", case=case, rows=rows)
    notice: list[str] = []
    for rid in ids:
        one = apb.RecordingRequest(purpose=LEGAL, reason=case, recording_id=rid)
        if action in CHANGES:
            await store.unary(token, CHANGES[action], one)
        elif action == "erase":
            await store.unary(token, "Erase", one)
        elif action == "unseal":
            sealed = await store.unary(token, "OpenSealedDigits", one)
            notice.append(f"{sealed.customer_masked[:-3]}{sealed.last_digits}")
        else:
            return message(request, 400, "bad_request", "bad_request")
    log.info("web_case_step", person=request.session["person"]["id"], action=action, count=len(ids))
    rows = await _views(request, case, ids)
    done = {"action": action, "count": len(ids), "unsealed": notice}
    values = {"case": case}
    return page(request, "case.html", case=case, rows=rows, values=values, errors=[], done=done)


async def _export(request: Request, case: str, ids: list[str]) -> Response:
    first, rest = await request.app.state.store.package(
        await bearer(request),
        apb.PackageRequest(purpose=LEGAL, reason=case, recording_ids=ids),
    )
    zone = ZoneInfo(request.app.state.config.time_zone)
    name = re.sub(r"[^\w.-]", "_", case)[:40] or "case"
    return StreamingResponse(
        stream_package(first, rest, case, zone),
        headers={
            "content-type": "application/zip",
            "content-disposition": f'attachment; filename="{name}.zip"',
            "cache-control": "no-store",
        },
    )


class _Pipe(io.RawIOBase):
    """A write-only, unseekable sink: zipfile then writes data descriptors, and what
    it wrote is taken out after each chunk (nothing buffered, nothing on disk)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


async def stream_package(
    first: apb.PackageChunk, rest: AsyncIterator[apb.PackageChunk], case: str, zone: ZoneInfo
) -> AsyncIterator[bytes]:
    """metadata.json, each recording's audio as it arrives, and a cover note in Finnish
    and English with local times."""
    pipe = _Pipe()
    metadata = json.loads(first.metadata_json)
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_STORED) as package:
        package.writestr("metadata.json", first.metadata_json)
        yield pipe.take()
        entry: Any = None
        current = ""
        async for chunk in rest:
            if chunk.file.name != current:  # the next recording's audio begins
                if entry is not None:
                    entry.close()
                current = chunk.file.name
                entry = package.open(current, "w", force_zip64=True)
            entry.write(chunk.file.data)
            yield pipe.take()
        if entry is not None:
            entry.close()
        package.writestr("LUE-MINUT_README.txt", cover_note(metadata, case, zone))
    yield pipe.take()


def cover_note(metadata: Any, case: str, zone: ZoneInfo) -> str:
    recordings = metadata.get("recordings", metadata) if isinstance(metadata, dict) else metadata
    lines = [
        f"Tietopyyntö / Data subject request: {case}",
        "",
        "Tämä paketti sisältää pyytämänne puhelutallenteet ja niiden tiedot",
        "(metadata.json). Ajat ovat Suomen aikaa, UTC-poikkeama suluissa.",
        "This package holds the call recordings you asked for and their details",
        "(metadata.json). Times are Finnish local time, with the UTC offset.",
        "",
    ]
    for item in recordings if isinstance(recordings, list) else []:
        started = item.get("started_at") if isinstance(item, dict) else None
        when = started
        if isinstance(started, str):
            with_zone = dt.datetime.fromisoformat(started.replace("Z", "+00:00"))
            when = timefmt.show(with_zone, zone)
        lines.append(f"- {item.get('recording_id', '?')}: {when}")
    return "\n".join(lines) + "\n"
