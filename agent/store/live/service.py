"""The store's Live service: appends, queries and finishes of calls still going on.

Every request is checked as untrusted input before anything is written: the recording
id, the caller's site (its certificate, as for uploads; a recording is only ever
touched by the site that started it), the manifest (the same checks as an upload's:
masked number, sealed tail, times, region), the leg names for the manifest's channels,
and each piece's size. The storage itself is :mod:`agent.store.live.segments`
(the row: :mod:`agent.store.live.rows`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
import sqlalchemy as sa

from agent import g711, logs
from agent.manifest import ManifestError, validate_manifest
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.catalog import live_recordings
from agent.store.ingest.service import MAX_CHUNK_BYTES, IngestService
from agent.store.live.archiver import LiveArchiver
from agent.store.live.rows import LEGS, LiveRejected, LiveRow
from agent.store.live.segments import LiveStore

log = logs.get_logger(__name__)

_ID = re.compile(r"[0-9a-f]{32}")
_SHA = re.compile(r"[0-9a-f]{64}")
MAX_LIVE_PER_SITE = 5000
ROW_CACHE = 4096
IO_THREADS = 32
FINISH_THREADS = 16
T = TypeVar("T")  # calls one site may stream at once (a bound, not a target)
# What this store takes on the wire (every answer says it, so an agent sends A-law only
# to a store that decodes it: agents and stores are upgraded one at a time).
ACCEPTS = [g711.to_pb(e) for e in g711.ENCODINGS]

Context = grpc.aio.ServicerContext[Any, Any]


def check_live_manifest(manifest: pb.Manifest, final: bool) -> None:
    """An upload's checks on a manifest whose archive does not exist yet: size and
    sha256 are the store's to fill in, the end is there only at finish."""
    probe = pb.Manifest()
    probe.CopyFrom(manifest)
    probe.audio_format, probe.size, probe.sha256 = "opus", 1, "0" * 64
    if not probe.HasField("ended_at"):
        if final:
            raise ManifestError("ended_at: required at finish")
        probe.ended_at.CopyFrom(probe.started_at)
    validate_manifest(probe)


class LiveService(pb_grpc.LiveServicer):
    def __init__(
        self, ingest: IngestService, live: LiveStore, archiver: LiveArchiver | None = None
    ) -> None:
        self.ingest = ingest
        self.live = live
        self.archiver = archiver
        self._rows: dict[str, LiveRow] = {}  # live rows seen lately (at most ROW_CACHE)
        # Appends wait on the disk (a blob fsync, a catalog commit), not on the CPU:
        # their own threads, so that many calls' appends are in flight at once (the
        # loop's default executor has cores + 4).
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="live-io")
        # Finishes (a hang-up waits for them) never queue behind the running calls'
        # appends: their own threads.
        self._finish_pool = ThreadPoolExecutor(FINISH_THREADS, thread_name_prefix="live-fin")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._finish_pool.shutdown(wait=True, cancel_futures=True)

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    async def _finishing(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._finish_pool, call, *args)

    def _finish_with_tail(
        self,
        row: LiveRow,
        final: pb.Manifest,
        legs: dict[str, tuple[int, str]],
        tail: list[pb.LegBytes],
    ) -> None:
        if tail:
            self.live.append(row, tail)
        self.live.finish(row, final, legs)

    def _remember(self, row: LiveRow) -> None:
        while len(self._rows) >= ROW_CACHE:
            self._rows.pop(next(iter(self._rows)))
        self._rows[row.recording_id] = row

    async def _abort(self, context: Context, exc: LiveRejected, rid: str) -> NoReturn:
        log.warning("live_refused", recording_id=rid, code=exc.code.name, reason=str(exc))
        await context.abort(exc.code, str(exc))
        raise AssertionError("unreachable")

    async def _row(
        self, rid: str, context: Context, cached: bool = False, finishing: bool = False
    ) -> tuple[LiveRow | None, str | None]:
        """The recording's live row (if any), after the id and the caller's site check;
        ``cached``: a live row read before will do (appends: the row lock in the
        append's transaction checks that it is still live); ``finishing``: read on the
        finishes' threads."""
        if not _ID.fullmatch(rid):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "recording_id: expected 32 hex digits"
            )
        site = await self.ingest.peer_site(context)
        row = self._rows.get(rid) if cached else None
        if row is None:
            run = self._finishing if finishing else self._io
            row = await run(self.live.get, rid)
            if row is not None and row.state == "live":
                self._remember(row)
        if row is not None and site is not None and row.site != site:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"recording {rid} was not started by site {site!r}",
            )
        return row, site

    async def Query(self, request: pb.LiveQueryRequest, context: Context) -> pb.LiveState:
        await self._row(request.recording_id, context)
        state = await self._io(self.live.state, request.recording_id)
        state.accepts.extend(ACCEPTS)
        return state

    async def Append(self, request: pb.LiveAppendRequest, context: Context) -> pb.LiveState:
        rid = request.recording_id
        row, site = await self._row(rid, context, cached=True)
        try:
            encoding = _encoding(request.encoding, row)
            legs = row.legs if row else LEGS.get(request.manifest.channels, ())
            _check_pieces(legs, request.legs, encoding)  # before anything is written
            if row is None:
                row = await self._start(request, site, context, encoding)
                _encoding(request.encoding, row)  # a race's winner may have another
            sizes = await self._io(self.live.append, row, list(request.legs))
        except LiveRejected as exc:
            self._rows.pop(rid, None)  # read it again next time (finished? discarded?)
            await self._abort(context, exc, rid)
        return pb.LiveState(
            recording_id=rid,
            known=True,
            legs=[pb.LegSize(leg=leg, size=sizes.get(leg, 0)) for leg in row.legs],
            encoding=g711.to_pb(row.encoding),
            accepts=ACCEPTS,
        )

    async def _start(
        self, request: pb.LiveAppendRequest, site: str | None, context: Context, encoding: str
    ) -> LiveRow:
        """The first append of a recording: its manifest, checked, makes the row."""
        rid = request.recording_id
        if not request.HasField("manifest"):
            raise LiveRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"recording {rid} is unknown here: the first append carries the manifest",
            )
        manifest = request.manifest
        if manifest.recording_id != rid:
            raise LiveRejected(grpc.StatusCode.INVALID_ARGUMENT, "manifest.recording_id differs")
        try:
            check_live_manifest(manifest, final=False)
        except ManifestError as exc:
            raise LiveRejected(grpc.StatusCode.INVALID_ARGUMENT, f"manifest: {exc}") from None
        await self.ingest.check_site(manifest, site, context)
        await self.ingest.check_region(manifest, context)
        if await self._io(self.live.catalog.get, rid) is not None:
            raise LiveRejected(grpc.StatusCode.ALREADY_EXISTS, f"recording {rid} is already stored")
        if await self._io(self._open_count, manifest.site) >= MAX_LIVE_PER_SITE:
            raise LiveRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"site {manifest.site!r} streams {MAX_LIVE_PER_SITE} calls already",
            )
        await self._io(self.live.create, manifest, encoding)
        row = await self._io(self.live.get, rid)
        assert row is not None
        self._remember(row)
        return row

    def _open_count(self, site: str) -> int:
        query = sa.select(sa.func.count()).where(
            live_recordings.c.site == site, live_recordings.c.state == "live"
        )
        with self.live.catalog.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    async def Finish(self, request: pb.LiveFinishRequest, context: Context) -> pb.LiveState:
        final = request.manifest
        rid = final.recording_id
        row, _site = await self._row(rid, context, finishing=True)
        try:
            if row is None:
                if await self._io(self.live.catalog.get, rid) is not None:
                    return pb.LiveState(recording_id=rid, known=False, finished=True)
                raise LiveRejected(grpc.StatusCode.NOT_FOUND, f"recording {rid} is unknown here")
            legs = _final_legs(row, final, request.legs)
            if row.state != "live" and self.live.reopenable(row) and _covers(row, legs):
                # its agent came back with at least what the store holds: the call is
                # live again, and its finish checks the rest as any finish does
                row = await self._io(self.live.reopen, rid) or row
            if row.state != "live":
                _check_same_finish(row, legs)
            else:
                _check_pieces(row.legs, request.tail, _encoding(request.encoding, row))
                tail = list(request.tail)
                await self._finishing(self._finish_with_tail, row, final, legs, tail)
        except LiveRejected as exc:
            await self._abort(context, exc, rid)
        self._rows.pop(rid, None)
        log.info(
            "live_finished",
            recording_id=rid,
            bytes=sum(size for size, _ in legs.values()),
            flags=",".join(final.flags) or "-",
        )
        if self.archiver is not None:
            self.archiver.wake()
        return pb.LiveState(
            recording_id=rid,
            known=True,
            legs=[pb.LegSize(leg=leg, size=legs[leg][0]) for leg in row.legs],
            finished=True,
            encoding=g711.to_pb(row.encoding),
            accepts=ACCEPTS,
        )


def _encoding(value: int, row: LiveRow | None) -> str:
    """The request's encoding (unset: PCM, as agents before the field sent), which
    must be the call's own once the store holds it."""
    try:
        encoding = g711.from_pb(value)
    except g711.UnknownEncoding as exc:
        raise LiveRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    if row is not None and encoding != row.encoding:
        raise LiveRejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"recording {row.recording_id} streams {row.encoding}, this request {encoding}: "
            "continue in the call's encoding (Query says it)",
        )
    return encoding


def _check_pieces(legs: tuple[str, ...], pieces: Any, encoding: str) -> None:
    width = g711.sample_bytes(encoding)
    if len(pieces) > len(legs) * 2:
        raise LiveRejected(grpc.StatusCode.INVALID_ARGUMENT, "too many pieces in one append")
    for piece in pieces:
        if piece.leg not in legs:
            raise LiveRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"leg {piece.leg[:20]!r}: expected one of {', '.join(legs) or '(none)'} "
                "for the manifest's channels",
            )
        if (
            not 0 < len(piece.data) <= MAX_CHUNK_BYTES
            or piece.offset < 0
            or len(piece.data) % width
            or piece.offset % width
        ):
            raise LiveRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"leg {piece.leg}: expected 1..{MAX_CHUNK_BYTES} bytes of "
                f"{g711.LABELS[encoding]} samples at a whole sample's offset >= 0",
            )


def _final_legs(row: LiveRow, final: pb.Manifest, legs: Any) -> dict[str, tuple[int, str]]:
    """The finish's per-leg sizes and digests, after the final manifest's checks."""
    if final.site != row.site or final.source != row.manifest.source:
        raise LiveRejected(
            grpc.StatusCode.INVALID_ARGUMENT, "final manifest: site or source differs"
        )
    if final.channels != row.manifest.channels:
        raise LiveRejected(grpc.StatusCode.INVALID_ARGUMENT, "final manifest: channels differs")
    try:
        check_live_manifest(final, final=True)
    except ManifestError as exc:
        raise LiveRejected(grpc.StatusCode.INVALID_ARGUMENT, f"final manifest: {exc}") from None
    found = {leg.leg: (leg.size, leg.sha256) for leg in legs}
    if set(found) != set(row.legs) or not all(_SHA.fullmatch(h) for _, h in found.values()):
        raise LiveRejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"finish: expected the size and sha256 of legs {', '.join(row.legs)}",
        )
    return found


def _covers(row: LiveRow, legs: dict[str, tuple[int, str]]) -> bool:
    """The agent's legs are at least as long as what the store finished the call with."""
    assert row.final is not None
    return all(size >= int(row.final["legs"][leg]["size"]) for leg, (size, _) in legs.items())


def _check_same_finish(row: LiveRow, legs: dict[str, tuple[int, str]]) -> None:
    """A finish repeated (its answer was lost) must be the same finish."""
    assert row.final is not None
    held = {leg: (int(v["size"]), v["sha256"]) for leg, v in row.final["legs"].items()}
    if held != legs:
        raise LiveRejected(
            grpc.StatusCode.ALREADY_EXISTS,
            f"recording {row.recording_id} is already finished with other legs "
            f"(store: {held}); its timeout may have finished it as incomplete",
        )


__all__ = ["LEGS", "LiveService", "check_live_manifest"]
