"""The store's archiver for live recordings: finished calls become stored recordings.

A thread that, every ``poll_s`` (or when woken by a Finish):
- finishes, as ``incomplete``, every live recording that received nothing for
  ``timeout_s`` (its agent host is gone): the audio it has is kept, its end is its
  start plus the longest leg;
- claims finished recordings (a lease in the catalog, so that on several replicas each
  is encoded once) and hands them to a bounded pool of encoders: the legs are read
  from their segments, interleaved (customer left, employee right), encoded by one
  ffmpeg process (Opus for speech, as the agent's archive), stored through the vault
  (own data key, sha256) and catalogued like an upload; then the segments go — or, for
  a call the store finished itself, are held for a returning agent's tail, whose
  finished call is archived again in place of the first archive
  (``agent.store.live.tail``).
A failed encode is logged and left: the lease expires and it is tried again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent import g711, logs
from agent.audio import OPUS_PARAMETERS
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store import monitoring
from agent.store.catalog import RecordingRow, now_ms
from agent.store.ingest.rows import row_from_manifest
from agent.store.live import archive_queue, tail
from agent.store.live.rows import HELD, LiveRow
from agent.store.live.segments import LiveStore

log = logs.get_logger(__name__)

SILENT_PEAK = 33  # |sample| below this everywhere: under -60 dBFS, a silent channel
LENGTH_MISMATCH_S = 1.0  # legs differing by more than a second
LEASE_S = 300.0
# Archiving is not on the hang-up's path (a call is safe once its Finish is answered):
# its threads and encoders yield the CPU to appends and finishes (Linux: a thread has
# its own nice value).
ARCHIVE_NICE = 10


def lower_priority(pid: int = 0) -> None:
    """``pid`` (0: the calling thread) runs at ARCHIVE_NICE (best effort)."""
    with contextlib.suppress(OSError):
        target = pid or threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, target, ARCHIVE_NICE)


@dataclass(frozen=True)
class Archive:
    data: bytes
    channels: int
    silent: tuple[int, ...]
    mismatch: bool


class _Reader:
    """``read(n)`` over a leg's decrypted segments, up to ``limit`` bytes (the leg's final
    size: the agent may have cut bytes it had sent)."""

    def __init__(self, blocks: Iterator[bytes], limit: int) -> None:
        self._blocks = blocks
        self._buffer = b""
        self._left = limit

    def read(self, count: int) -> bytes:
        count = min(count, self._left)
        while len(self._buffer) < count:
            more = next(self._blocks, None)
            if more is None:
                break
            self._buffer += more
        out, self._buffer = self._buffer[:count], self._buffer[count:]
        self._left -= len(out)
        return out


def interleave(left: bytes, right: bytes) -> bytes:
    """Two mono 16-bit blocks (zero-padded to the longer) as one stereo block."""
    size = max(len(left), len(right))
    left, right = left.ljust(size, b"\0"), right.ljust(size, b"\0")
    out = bytearray(2 * size)
    out[0::4], out[1::4] = left[0::2], left[1::2]
    out[2::4], out[3::4] = right[0::2], right[1::2]
    return bytes(out)


def _peak(block: bytes) -> int:
    """The largest |sample| of a PCM block (every sample: every 4th read a 1 kHz tone,
    whose every 4th sample is a zero crossing, as a silent channel)."""
    return g711.peak(block[: len(block) - len(block) % 2])


def encode_legs(live: LiveStore, row: LiveRow, bitrate: str, sizes: dict[str, int]) -> Archive:
    """The leg(s) of ``row`` as one Ogg/Opus file, in memory (a day-long call is ~250 MB);
    legs streamed in A-law are decoded to PCM on the way to the encoder."""
    legs = row.legs
    key = live.data_key(row)
    readers = [_Reader(live.read_leg(row, leg, key), sizes.get(leg, 0)) for leg in legs]
    command = [
        "ffmpeg", "-hide_banner", "-loglevel", "error",
        "-f", "s16le", "-ar", "8000", "-ac", str(len(legs)), "-i", "pipe:0",
        "-c:a", "libopus", "-b:a", bitrate, *OPUS_PARAMETERS, "-f", "ogg", "pipe:1",
    ]  # fmt: skip
    peaks = [0] * len(legs)
    failure: list[BaseException] = []
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdin and process.stdout and process.stderr
        lower_priority(process.pid)
        writer = threading.Thread(
            target=_feed, args=(process.stdin, readers, row.encoding, peaks, failure), daemon=True
        )
        writer.start()
        out = process.stdout.read()  # ffmpeg at -loglevel error writes little to stderr
        err = process.stderr.read()
        process.wait()
        writer.join()
    if failure:
        raise failure[0]
    if process.returncode != 0:
        raise RuntimeError(f"ffmpeg exited {process.returncode}: {err.decode()[-300:]}")
    lengths = [sizes.get(leg, 0) for leg in legs]
    return Archive(
        data=out,
        channels=len(legs),
        silent=tuple(i for i, p in enumerate(peaks) if p < SILENT_PEAK),
        mismatch=max(lengths) - min(lengths) > LENGTH_MISMATCH_S * row.bytes_per_second,
    )


def _feed(
    sink: IO[bytes],
    readers: list[_Reader],
    encoding: str,
    peaks: list[int],
    failure: list[BaseException],
) -> None:
    """Write the legs to the encoder as PCM, one second at a time (interleaved when two)."""
    lower_priority()
    second = g711.bytes_per_second(encoding)
    try:
        with sink:
            while blocks := [r.read(second) for r in readers]:
                if not any(blocks):
                    break
                blocks = [g711.decode(encoding, block) for block in blocks]
                for i, block in enumerate(blocks):
                    peaks[i] = max(peaks[i], _peak(block))
                sink.write(blocks[0] if len(blocks) == 1 else interleave(*blocks))
    except BaseException as exc:  # noqa: BLE001 - raised again by encode_legs
        failure.append(exc)


class _Plain:
    """The archive's bytes as the vault's ``PlainSource``."""

    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._io = io.BytesIO(data)

    def read(self, count: int = -1) -> bytes:
        return self._io.read(count)

    def close(self) -> None:
        self._io.close()


class LiveArchiver:
    def __init__(
        self,
        live: LiveStore,
        timeout_s: float = 60.0,
        encoders: int = 2,
        bitrate: str = "24k",
        poll_s: float = 1.0,
    ) -> None:
        self.live = live
        self.timeout_s = timeout_s
        self.bitrate = bitrate
        self.poll_s = poll_s
        self.encoders = encoders
        self._pool = ThreadPoolExecutor(encoders, thread_name_prefix="live-encode")
        self._busy = threading.Semaphore(encoders)
        self._wake = threading.Event()
        self._next_forget = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-archiver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                self.expire_stale()
                tail.release_held(self.live)
                self._dispatch()
                self._forget_archived()
            except Exception:  # the catalog may be away; next pass
                log.exception("live_archiver_failed")

    def _dispatch(self) -> None:
        while not self._stop.is_set() and self._busy.acquire(blocking=False):
            row = archive_queue.claim(self.live, LEASE_S)
            if row is None:
                self._busy.release()
                return
            self._pool.submit(self._archive_one, row)

    def _forget_archived(self) -> None:
        if time.monotonic() >= self._next_forget:
            self._next_forget = time.monotonic() + 3600
            archive_queue.forget_archived(self.live)

    def _archive_one(self, row: LiveRow) -> None:
        lower_priority()  # this pool's thread only archives
        try:
            self.archive(row)
        except Exception:  # left for the next lease
            log.exception("live_archive_failed", recording_id=row.recording_id)
        finally:
            self._busy.release()
            self._wake.set()

    def expire_stale(self) -> list[str]:
        """Finish, as incomplete, what no agent has appended to for ``timeout_s``."""
        cutoff = now_ms() - int(self.timeout_s * 1000)
        done = []
        for rid in archive_queue.stale(self.live, cutoff):
            row = self.live.get(rid)
            if row is None:
                continue
            legs = {leg: self.live.leg_digest(row, leg) for leg in row.legs}
            final = pb.Manifest()
            final.CopyFrom(row.manifest)
            seconds = max(size for size, _ in legs.values()) / row.bytes_per_second
            started = final.started_at.ToDatetime(dt.UTC)
            final.ended_at.FromDatetime(started + dt.timedelta(seconds=seconds))
            if "incomplete" not in final.flags:
                final.flags.append("incomplete")
            extra = {"timed_out_at_ms": now_ms(), **row.carried()}
            if self.live.mark_finished(rid, final, legs, "live", cutoff, extra):
                log.warning(
                    "live_timed_out",
                    recording_id=rid,
                    site=row.site,
                    silent_for_s=round((now_ms() - row.last_append_ms) / 1000, 1),
                    audio_s=round(seconds, 1),
                    flags="incomplete",
                )
                done.append(rid)
        return done

    def archive(self, row: LiveRow) -> None:
        """Encode, store and catalogue one finished live recording, then drop its
        segments (held instead when the store finished it: a tail may follow)."""
        rid = row.recording_id
        assert row.final is not None
        stored = self.live.catalog.get(rid)
        reopened = row.final.get("reopened_from")
        if stored is None and reopened == HELD:
            tail.forget_destroyed(self.live, row)  # erased or discarded meanwhile
            return
        if stored is None or reopened:
            self._store(row, stored)
        if row.final.get("timed_out_at_ms") is not None:
            tail.hold(self.live, row)
        else:
            archive_queue.remove(self.live, row)

    def _store(self, row: LiveRow, stored: RecordingRow | None) -> None:
        """The archive, as a new recording or in place of ``stored`` (a tail came)."""
        started = time.monotonic()
        rid = row.recording_id
        vault = self.live.vault
        final = row.final_manifest()
        assert row.final is not None
        sizes = {leg: int(v["size"]) for leg, v in row.final["legs"].items()}
        archive = encode_legs(self.live, row, self.bitrate, sizes)
        final.audio_format, final.channels = "opus", archive.channels
        final.size = len(archive.data)
        final.sha256 = _sha256(archive.data)
        _add_flags(final, archive)
        blob_key = vault.store(
            rid,
            Path("/dev/null"),
            self.live.work_dir,
            expected_sha256=final.sha256,
            opener=lambda: _Plain(archive.data),
        )
        new = row_from_manifest(final, blob_key=blob_key, region=vault.region)
        if stored is not None:
            tail.replace_archive(vault, stored, new)
            return
        # under the key row's lock, like an upload's commit: a sweeper discarding
        # orphans never shreds this key between its store and its row
        if not vault.commit_row(new):
            vault.discard(rid, blob_key)  # another archiver won
            return
        monitoring.UPLOADS_STORED.inc()
        monitoring.BYTES_STORED.inc(final.size)
        log.info(
            "recording_stored",
            recording_id=rid,
            site=final.site,
            path="live",
            bytes=final.size,
            audio_s=round(max(sizes.values(), default=0) / row.bytes_per_second, 1),
            customer=final.customer.masked,
            employee=final.employees[0].name if final.employees else "unknown",
            flags=",".join(final.flags) or "-",
            encode_s=round(time.monotonic() - started, 3),
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_flags(final: pb.Manifest, archive: Archive) -> None:
    flags = []
    if archive.mismatch:
        flags.append("length_mismatch")
    if archive.channels == 2:
        flags += [("silent_customer", "silent_employee")[i] for i in archive.silent]
    for flag in flags:
        if flag not in final.flags:
            final.flags.append(flag)
