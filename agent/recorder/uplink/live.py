"""Live upload: calls stream to the store while they run (``[uplink] live = true``).

A loop in the agent's main process (the workers' one thread belongs to pjsua) tails
every active capture's legs every ``live_flush``: the samples after each WAV's 44-byte
header (mono 16-bit PCM, 8 kHz) that the store does not hold yet go out in one
``Live.Append`` per call, with explicit offsets, as G.711 A-law (half the bytes) when
the store accepts it, else as the PCM itself (``agent.g711``: one encoding per call,
the store's answer names it; offsets, sizes and sha256 count the bytes as sent). What
the store holds is learnt from its answers (``Query`` when a call is first seen, or
after an error), so after a cut, a store restart or an agent restart the stream
resumes from the store's durable sizes, and bytes sent twice are skipped by the store
(no duplicate). The first append of a call carries its manifest: the masked number and
the sealed tail, as the file path sends them (the full number never leaves the worker).

At hang-up the worker moves the capture to ``captures/ready``; the finalize queue hands
SIPREC and plain captures to :meth:`LiveUplink.finish` instead of encoding them: one
``Live.Finish`` with the tail (the bytes the store lacks, when they fit one message),
the final manifest (end, flags, employees after a transfer) and each leg's size and
sha256 (hashed as the bytes were sent: only what was not is read for it). Only when
the store answers ``finished`` (all bytes durable and matching) is the capture
deleted. If the store is unreachable the capture simply stays (active or ready) and is
caught up later: the agent keeps no encoder on this path, and there is no fallback to
the file upload (so a recording never reaches the store twice).

A call discarded through the recording control (issue 21) while it runs is told to the
store on the next pass (``Ingest.Discard`` with the tombstone's manifest, its end the
moment it is sent): the store destroys the segments it holds and keeps the
catalogue entry without audio at once, not at hang-up; the hang-up's own Discard (the
file way, from the outbox) then finds it done.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from agent import g711, logs, metrics
from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Flag,
    iso_ms,
    quarantine,
    read_meta,
    utc_now,
)
from agent.config import AgentConfig
from agent.manifest import discard_manifest_from_capture, manifest_from_capture
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc

log = logs.get_logger(__name__)

WAV_HEADER = 44
MAX_PIECE = 128 * 1024  # wire bytes of one leg per append (two legs fit a gRPC message)
MAX_APPENDS_PER_PASS = 4  # catching up: up to 4 x 16 s (A-law; PCM 8 s) per leg per pass
RPC_TIMEOUT_S = 10.0
SYNC_THREADS = 16  # appends wait on the store's disk, not on this CPU
FINISH_ATTEMPTS = 3
MARK_BYTES = 16000  # wire bytes of one leg between its digest marks (PCM 1 s, A-law 2 s)
MARKS = 16  # the marks kept: more than edge.MAX_STAMP_AGE_S of audio
EMPTY_SHA256 = hashlib.sha256().hexdigest()
# The store is unreachable or busy: the data stays on disk and the next pass retries.
UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}


def leg_name(file_name: str) -> str:
    return file_name.removesuffix(".wav")


@dataclass
class _Track:
    """What this agent knows of one call at the store."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sizes: dict[str, int] | None = None  # None: ask the store (Query)
    known: bool = False  # the store has the call's row (no manifest needed)
    encoding: str = g711.PCM16  # how this call's legs travel (set by the Query)
    finished: bool = False
    discarded: bool = False  # the store was told of a discard (Ingest.Discard)
    # Each leg's sha256 over the bytes read so far (the leg files only grow, so this
    # holds whatever the store has: the Finish hashes only the rest).
    digests: dict[str, _LegDigest] = field(default_factory=dict)


@dataclass
class _LegDigest:
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    # (size, digest) about once a second of audio, over the last MARKS: a leg cut at
    # hang-up to the front's end of the call (after those bytes were sent) is hashed
    # from the mark before the cut, not from its start.
    marks: collections.deque[tuple[int, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=MARKS)
    )

    def extend(self, offset: int, data: bytes) -> None:
        if offset == self.size:
            if not self.marks or self.size - self.marks[-1][0] >= MARK_BYTES:
                self.marks.append((self.size, self.digest.copy()))
            self.digest.update(data)
            self.size += len(data)

    def at_most(self, size: int) -> _LegDigest:
        """The digest of the first bytes of the leg, up to ``size`` or fewer."""
        if size >= self.size:
            return _LegDigest(self.digest.copy(), self.size)
        for at, digest in reversed(self.marks):
            if at <= size:
                return _LegDigest(digest.copy(), at)
        return _LegDigest()


class LiveUplink:
    def __init__(self, config: AgentConfig, channel: grpc.Channel, region: str = "fi") -> None:
        self.config = config
        self.region = region
        self.stub = pb_grpc.LiveStub(channel)
        self.ingest = pb_grpc.IngestStub(channel)
        self.active_root = config.captures_dir / "active"
        self.ready_root = config.captures_dir / "ready"
        self.stop_event = threading.Event()
        self._tracks: dict[str, _Track] = {}
        self._tracks_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="live-sync")
        self._thread = threading.Thread(target=self._run, name="live-uplink", daemon=True)
        self._down_since: float | None = None
        self.bytes_sent = 0

    # ------------------------------------------------------------ the loop

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(5.0)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        flush = self.config.uplink.live_flush_s
        while not self.stop_event.wait(flush):
            try:
                self.pass_once()
            except Exception:  # a bad pass must not stop the stream; logged, next pass
                log.exception("live_pass_failed")

    def active_captures(self) -> list[Path]:
        if not self.active_root.is_dir():
            return []
        return [
            capture
            for worker in self.active_root.iterdir()
            if worker.is_dir()
            for capture in worker.iterdir()
            if capture.is_dir() and not capture.name.startswith(".")
        ]

    def pass_once(self) -> None:
        """One flush of every active call (in parallel, bounded)."""
        captures = self.active_captures()
        names = {c.name for c in captures}
        for _ in self._pool.map(self._sync_quietly, captures):
            pass
        with self._tracks_lock:
            for rid in [r for r in self._tracks if r not in names]:
                if not (self.ready_root / rid).exists():
                    del self._tracks[rid]

    def _sync_quietly(self, capture: Path) -> None:
        try:
            self.sync(capture, final=False)
        except (OSError, ValueError, KeyError) as exc:  # a capture being moved or opened
            log.debug("live_sync_skipped", recording_id=capture.name, reason=str(exc))

    def _track(self, rid: str) -> _Track:
        with self._tracks_lock:
            return self._tracks.setdefault(rid, _Track())

    # ------------------------------------------------------------ one call

    def sync(self, capture: Path, final: bool, keep_tail: bool = False) -> bool:
        """Send what the store lacks of this capture; True when it holds all of it
        (``keep_tail``: or when the rest fits in one message, for the Finish)."""
        track = self._track(capture.name)
        with track.lock:
            if track.finished:
                return True
            meta = read_meta(capture)
            if Flag.DISCARDED in meta.flags:
                self._discard(meta, track)
                return False
            legs = _legs(meta)
            if not final and not _has_audio(capture, legs):
                return False  # not answered yet (or no audio yet): nothing to start
            try:
                return self._send(capture, meta, legs, track, final, keep_tail)
            except grpc.RpcError as exc:
                self._failed(capture.name, track, exc)
                return False

    def _send(
        self,
        capture: Path,
        meta: CaptureMeta,
        legs: tuple[str, ...],
        track: _Track,
        final: bool,
        keep_tail: bool = False,
    ) -> bool:
        if track.sizes is None:
            state = self.stub.Query(
                pb.LiveQueryRequest(recording_id=meta.recording_id), timeout=RPC_TIMEOUT_S
            )
            track.sizes = {s.leg: s.size for s in state.legs}
            # finished: the store holds the call whole (its Finish), or finished it
            # itself (timed out): nothing more is appended; Finish tells which.
            track.known, track.finished = state.known, state.finished
            track.encoding = wire_encoding(state, self.config.uplink.live_encoding)
            if track.finished:
                return True
        appends = 0
        while final or appends < MAX_APPENDS_PER_PASS:
            pieces = _pieces(capture, legs, track.sizes, track.encoding)
            for piece in pieces:
                track.digests.setdefault(piece.leg, _LegDigest()).extend(piece.offset, piece.data)
            if not pieces and track.known:
                break
            if keep_tail and track.known and all(len(p.data) < MAX_PIECE for p in pieces):
                return True  # the rest goes with the Finish
            request = pb.LiveAppendRequest(
                recording_id=meta.recording_id, legs=pieces, encoding=g711.to_pb(track.encoding)
            )
            if not track.known:
                request.manifest.CopyFrom(self._manifest(meta, legs, final=False))
            state = self.stub.Append(request, timeout=RPC_TIMEOUT_S)
            sent = sum(len(p.data) for p in pieces)
            self.bytes_sent += sent
            metrics.UPLOAD_BYTES_SENT.inc(sent)
            track.sizes, track.known = {s.leg: s.size for s in state.legs}, True
            appends += 1
            self._reachable()
        return not _pieces(capture, legs, track.sizes, track.encoding, peek=True)

    def _discard(self, meta: CaptureMeta, track: _Track) -> None:
        """Tell the store at once that a running call was discarded (once per call)."""
        if track.discarded:
            return
        ended = meta if meta.ended_at else replace(meta, ended_at=iso_ms(utc_now()))
        request = pb.DiscardRequest(manifest=discard_manifest_from_capture(ended, self.region))
        try:
            self.ingest.Discard(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            self._failed(meta.recording_id, track, exc)
            # unreachable: the next pass tries again; refused: once (the hang-up's
            # Discard from the outbox goes the file way, which quarantines a refusal)
            track.discarded = exc.code() not in UNREACHABLE
            return
        track.discarded = True
        self._reachable()
        log.info("live_discard_sent", recording_id=meta.recording_id, at="mid_call")

    def _manifest(self, meta: CaptureMeta, legs: tuple[str, ...], final: bool) -> pb.Manifest:
        ended = meta if final else replace(meta, ended_at=meta.started_at)
        manifest = manifest_from_capture(ended, "opus", len(legs), 0, "", self.region)
        if not final:
            manifest.ClearField("ended_at")
        manifest.ClearField("size")
        manifest.ClearField("sha256")
        return manifest

    def _failed(self, rid: str, track: _Track, exc: grpc.RpcError) -> None:
        code = exc.code()
        track.sizes = None  # ask the store again before the next append
        if code in UNREACHABLE:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("live_store_unreachable", code=code.name, action="kept_on_disk")
            return
        log.warning(
            "live_append_refused",
            recording_id=rid,
            code=code.name,
            reason=(exc.details() or "")[:200],
        )

    def _reachable(self) -> None:
        if self._down_since is not None:
            log.info("live_store_reachable", down_s=round(time.monotonic() - self._down_since, 1))
            self._down_since = None

    # ------------------------------------------------------------ hang-up

    def handles(self, recording_id: str) -> bool:
        """Whether a ready capture goes the live way (SIPREC and plain; not spool)."""
        try:
            meta = read_meta(self.ready_root / recording_id)
        except (OSError, ValueError, KeyError, TypeError):
            return False  # finalize quarantines what it cannot read
        # A discarded call goes the file way: its tombstone is an Ingest.Discard.
        return meta.source != "spool" and Flag.DISCARDED not in meta.flags

    def finish(self, recording_id: str) -> None:
        """A hung-up capture: its Finish (with the tail); deleted once the store has it all."""
        capture = self.ready_root / recording_id
        started = time.monotonic()
        for attempt in range(FINISH_ATTEMPTS):
            if not capture.is_dir() or self.stop_event.is_set():
                return
            # The first Finish carries the call's last bytes (one round trip from the
            # hang-up); a retry appends them first (e.g. a store that ignores them).
            with_tail = attempt == 0
            if not self.sync(capture, final=True, keep_tail=with_tail):
                return  # the store is away: the rescan offers it again
            outcome = self._finish_once(capture, with_tail)
            if outcome != "retry":
                break
        else:
            return
        if outcome == "done":
            self._remove(capture, started)

    def _finish_once(self, capture: Path, with_tail: bool) -> str:
        meta = read_meta(capture)
        track = self._track(capture.name)
        legs = _legs(meta)
        request = pb.LiveFinishRequest(
            manifest=self._manifest(meta, legs, final=True), encoding=g711.to_pb(track.encoding)
        )
        with track.lock:  # the digests are the live loop's too
            if with_tail:
                request.tail.extend(_pieces(capture, legs, track.sizes, track.encoding))
            for piece in request.tail:
                track.digests.setdefault(piece.leg, _LegDigest()).extend(piece.offset, piece.data)
            for leg in legs:
                size, sha256 = _leg_digest(
                    capture / f"{leg}.wav", track.encoding, track.digests.get(leg)
                )
                request.legs.append(pb.LegFinal(leg=leg, size=size, sha256=sha256))
        try:
            state = self.stub.Finish(request, timeout=RPC_TIMEOUT_S * 3)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.ALREADY_EXISTS:
                moved = quarantine(
                    capture, self.config.quarantine_dir, f"live finish refused: {exc.details()}"
                )
                log.error(
                    "live_finish_refused",
                    recording_id=capture.name,
                    reason=exc.details(),
                    kept_in=moved,
                )
                return "refused"
            self._failed(capture.name, track, exc)
            return "retry" if code not in UNREACHABLE else "later"
        sent = sum(len(p.data) for p in request.tail)
        self.bytes_sent += sent
        metrics.UPLOAD_BYTES_SENT.inc(sent)
        track.finished = state.finished
        return "done" if state.finished else "retry"

    def _remove(self, capture: Path, started: float) -> None:
        done = capture.with_name(f".live-done-{capture.name}")
        capture.rename(done)
        shutil.rmtree(done, ignore_errors=True)
        with self._tracks_lock:
            self._tracks.pop(capture.name, None)
        metrics.UPLOADS.labels("receipt_ok").inc()
        log.info(
            "recording_uploaded",
            recording_id=capture.name,
            path="live",
            tail_s=round(time.monotonic() - started, 3),
            outcome="live_finished",
        )


def wire_encoding(state: pb.LiveState, configured: str = "alaw") -> str:
    """A call the store knows goes on in its own encoding (an older agent may have
    started it in PCM); a new one goes in A-law if so configured (``[uplink]
    live_encoding``) and the store takes it (a store older than the field says
    nothing: PCM)."""
    if state.known:
        return g711.from_pb(state.encoding)
    if configured == "alaw" and pb.LIVE_ENCODING_ALAW in state.accepts:
        return g711.ALAW
    return g711.PCM16


def _legs(meta: CaptureMeta) -> tuple[str, ...]:
    if CUSTOMER_LEG in meta.legs or EMPLOYEE_LEG in meta.legs:
        return ("customer", "employee")
    return ("mixed",)


def _has_audio(capture: Path, legs: tuple[str, ...]) -> bool:
    for leg in legs:
        with contextlib.suppress(FileNotFoundError):
            if (capture / f"{leg}.wav").stat().st_size > WAV_HEADER:
                return True
    return False


def _pieces(
    capture: Path,
    legs: tuple[str, ...],
    sizes: dict[str, int] | None,
    encoding: str,
    peek: bool = False,
) -> list[pb.LegBytes]:
    """Each leg's next samples past what the store holds (``sizes``: wire bytes), in
    ``encoding`` (at most MAX_PIECE bytes)."""
    pieces = []
    width = g711.sample_bytes(encoding)
    for leg in legs:
        held = (sizes or {}).get(leg, 0)
        start = WAV_HEADER + held // width * 2  # where the store's bytes end in the file
        try:
            with (capture / f"{leg}.wav").open("rb") as fh:
                fh.seek(0, 2)
                available = fh.tell() - start
                available -= available % 2
                if available <= 0:
                    continue
                if peek:
                    return [pb.LegBytes(leg=leg)]
                fh.seek(start)
                pcm = fh.read(min(available, MAX_PIECE // width * 2))
        except FileNotFoundError:
            continue
        pieces.append(pb.LegBytes(leg=leg, offset=held, data=g711.encode(encoding, pcm)))
    return pieces


def _leg_digest(path: Path, encoding: str, running: _LegDigest | None = None) -> tuple[int, str]:
    """Size and sha256 of a leg as sent in ``encoding`` (its PCM after the header; a
    missing leg is empty), continuing ``running`` (the bytes already sent) when given."""
    width = g711.sample_bytes(encoding)
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            end = fh.tell() - WAV_HEADER
            end -= end % 2 if end > 0 else 0
            # the worker may have cut the leg (to the front's end) after it was sent
            running = (running or _LegDigest()).at_most(end // 2 * width)
            digest, size = running.digest, running.size
            at = size // width * 2
            fh.seek(WAV_HEADER + at)
            while at < end and (block := fh.read(min(1 << 20, end - at))):
                data = g711.encode(encoding, block)
                digest.update(data)
                size += len(data)
                at += len(block)
    except FileNotFoundError:
        return (running.size, running.digest.hexdigest()) if running else (0, EMPTY_SHA256)
    return size, digest.hexdigest()
