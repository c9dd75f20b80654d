"""The player's audio: HTTP Range requests answered by the store's PlayRange (which
decrypts only the chunks covering the range). One range per request; overlapping or
adjacent ranges are merged, ranges past the end are clipped, a range that starts past
the end gets 416. Each answer is at most ``MAX_PART`` bytes (the browser asks for the
rest), ``Cache-Control: no-store`` and ``Content-Disposition: inline``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from agent import logs
from agent.web.pages import RID, refused, signed_in
from agent.web.signin.auth import bearer
from agent.web.store_client import Range, StoreRefused

log = logs.get_logger(__name__)
MAX_PART = 1024 * 1024
RESUMES = 2  # times an answer cut by its replica's death is continued from another
# How a stream cut mid-answer ends: UNAVAILABLE (the connection to the store broke) or,
# through HAProxy in HTTP/2 mode, UNKNOWN "Stream removed" (it ends the stream without
# the store's status). A read asked again is harmless (and audited as one more read).
CUT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
MEDIA_TYPES = {"opus": "audio/ogg", "flac": "audio/flac", "wav": "audio/wav"}


class BadRange(ValueError):
    """A Range header this server does not serve (416)."""


def parse_range(header: str, size: int | None = None) -> tuple[int, int | None]:
    """``bytes=a-b[, c-d…]`` → (first byte, last byte or None for "to the end").
    ``bytes=-n`` (the last n bytes) needs ``size``; several ranges must merge into one."""
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs or len(specs) > 200:
        raise BadRange(header)
    spans: list[tuple[int, int | None]] = []
    for spec in specs.split(","):
        match = _SPEC.match(spec)
        if match is None or match.group().strip() == "-":
            raise BadRange(header)
        first, last = match.groups()
        if not first:
            if size is None:
                raise BadRange(header)
            spans.append((max(0, size - int(last)), None))
        else:
            end = int(last) if last else None
            if end is not None and end < int(first):
                raise BadRange(header)
            spans.append((int(first), end))
    spans.sort(key=lambda s: s[0])
    start, end = spans[0]
    for first, last in spans[1:]:
        if end is not None and first > end + 1:
            raise BadRange(header)  # disjoint ranges: no multipart answers here
        end = None if end is None or last is None else max(end, last)
    return start, end


def _unsatisfiable(size: int | None) -> Response:
    headers = {"cache-control": "no-store"}
    if size is not None:
        headers["content-range"] = f"bytes */{size}"
    return Response(b"", 416, headers=headers)


@signed_in
async def audio(request: Request) -> Response:
    rid = request.path_params["rid"]
    purpose = request.session.get("purposes", {}).get(rid)
    if not RID.match(rid) or not purpose:
        return Response(b"choose a purpose first", 409, headers={"cache-control": "no-store"})
    header = request.headers.get("range")
    try:
        start, end = parse_range(header) if header else (0, None)
    except BadRange:
        if header and "=-" in header.replace(" ", ""):
            return await _suffix(request, rid, purpose, header)
        return _unsatisfiable(None)
    return await _serve(request, rid, purpose, start, end, partial=header is not None)


@signed_in
async def waveform(request: Request) -> Response:
    """The whole recording's waveform (the store computes it from the audio): JSON of
    ``duration_ms`` and each channel's peak levels 0..255 in equal slices."""
    rid = request.path_params["rid"]
    purpose = request.session.get("purposes", {}).get(rid)
    if not RID.match(rid) or not purpose:
        return Response(b"choose a purpose first", 409, headers={"cache-control": "no-store"})
    store = request.app.state.store
    try:
        found = await store.waveform(await bearer(request), rid, purpose)
    except StoreRefused as exc:
        return _refused(request, exc)
    body = {"duration_ms": found.duration_ms, "left": list(found.left),
            "right": list(found.right)}  # fmt: skip
    return JSONResponse(body, headers={"cache-control": "no-store"})


async def _suffix(request: Request, rid: str, purpose: str, header: str) -> Response:
    """``bytes=-n``: learn the size with a one-byte read, then serve the tail."""
    try:
        probe = await _part(request, rid, purpose, 0, 0)
        await _drain(probe)
        start, end = parse_range(header, probe.total)
    except BadRange:
        return _unsatisfiable(None)
    except StoreRefused as exc:
        return _refused(request, exc)
    return await _serve(request, rid, purpose, start, end, partial=True)


async def _serve(
    request: Request, rid: str, purpose: str, start: int, end: int | None, partial: bool
) -> Response:
    try:
        part = await _part(request, rid, purpose, start, end)
    except StoreRefused as exc:
        return _refused(request, exc)
    total = part.total
    last = min(total - 1, start + MAX_PART - 1 if end is None else min(end, start + MAX_PART - 1))
    headers = {
        "cache-control": "no-store",
        "accept-ranges": "bytes",
        "content-disposition": "inline",
        "content-length": str(last - start + 1),
    }
    status = 200
    if partial or last < total - 1:
        status, headers["content-range"] = 206, f"bytes {start}-{last}/{total}"
    media = MEDIA_TYPES.get(part.audio_format, "application/octet-stream")
    body = _body(request, rid, purpose, part, last)
    return StreamingResponse(body, status, headers=headers, media_type=media)


async def _part(request: Request, rid: str, purpose: str, start: int, end: int | None) -> Range:
    length = MAX_PART if end is None else min(MAX_PART, end - start + 1)
    store = request.app.state.store
    return await store.play_range(await bearer(request), rid, purpose, start, length)  # type: ignore[no-any-return]


def _refused(request: Request, exc: StoreRefused) -> Response:
    if exc.code is grpc.StatusCode.OUT_OF_RANGE:
        size = re.search(r"0\.\.(\d+)", exc.message)
        return _unsatisfiable(int(size.group(1)) + 1 if size else None)
    return refused(request, exc)


async def _body(
    request: Request, rid: str, purpose: str, part: Range, last: int
) -> AsyncIterator[bytes]:
    """The bytes up to ``last``. When the store replica streaming them dies mid-answer
    (the status and the first bytes have gone, so neither the page nor gRPC's own
    retry can help), the rest is asked for again through the balancer, from
    the first byte not yet sent (another audited read of what is left), so the
    listener's answer arrives whole."""
    at = part.offset
    for attempt in range(RESUMES + 1):
        try:
            if attempt:
                part = await _part(request, rid, purpose, at, last)
            yield part.first
            at += len(part.first)
            async for chunk in part.rest:
                yield chunk.data
                at += len(chunk.data)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in CUT or attempt == RESUMES:
                log.warning("audio_cut", recording_id=rid, offset=at, code=exc.code().name)
                raise
            log.info("audio_resumed", recording_id=rid, offset=at, why=exc.code().name)


async def _drain(part: Range) -> None:
    async for _ in part.rest:
        pass
