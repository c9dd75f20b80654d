"""A recording's waveform for the web player: each channel's peak level in ``SLICES``
equal slices of its length, so the whole call is drawn before any audio is fetched.

The vault decrypts the recording into ffmpeg's stdin (pipes only: no plaintext on
disk), ffmpeg decodes it to 4 kHz 16-bit stereo on stdout, and the peaks are taken
slice by slice as the samples stream (memory stays at one slice). An hour of Opus
takes a few seconds of one core, so computations are bounded (``PARALLEL``) and the
results of the last ``CACHED`` recordings are kept in memory; the gate (rules and
audit) runs for every request, cached or not, and an erased recording is refused
before the cache is asked."""

from __future__ import annotations

import array
import asyncio
import contextlib
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent import logs
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.store.access.rules import Operation

if TYPE_CHECKING:
    from agent.store.access.service import AccessService, Context
    from agent.store.archive.vault import Vault
    from agent.store.catalog import RecordingRow

log = logs.get_logger(__name__)

SLICES = 1200
RATE = 4000  # samples a second per channel: enough for a level, cheap to decode
PARALLEL = 2
CACHED = 256
TIMEOUT_S = 120.0
WARM_FROM_MS = 60_000  # shorter recordings take well under a second when asked


@dataclass(frozen=True)
class Waveform:
    duration_ms: int
    left: bytes
    right: bytes


class WaveformError(Exception):
    """ffmpeg could not decode the recording (or took too long)."""


class Waveforms:
    """The bounded computations and the cache of one store process. One computation per
    recording at a time: a request while it runs waits for it."""

    def __init__(self) -> None:
        self._slots = asyncio.Semaphore(PARALLEL)
        self._cache: OrderedDict[str, Waveform] = OrderedDict()
        self._running: dict[str, asyncio.Task[Waveform]] = {}

    async def of(self, vault: Vault, row: RecordingRow) -> Waveform:
        found = self._cache.get(row.recording_id)
        if found is None:
            found = await asyncio.shield(self._start(vault, row))
        self._keep(row.recording_id, found)
        return found

    def warm(self, vault: Vault, row: RecordingRow) -> None:
        """Compute a long recording's waveform ahead (its page was just opened in the
        web: the player will ask once a purpose is chosen), when a slot is free. Nothing
        leaves the store and nothing is audited until the player asks."""
        rid = row.recording_id
        if row.duration_ms < WARM_FROM_MS or row.restricted or self._slots.locked():
            return
        if rid not in self._cache:
            self._start(vault, row)

    def _start(self, vault: Vault, row: RecordingRow) -> asyncio.Task[Waveform]:
        rid = row.recording_id
        running = self._running.get(rid)
        if running is None:
            running = asyncio.get_running_loop().create_task(self._compute(vault, row))
            self._running[rid] = running
            running.add_done_callback(lambda _: self._running.pop(rid, None))
            running.add_done_callback(_quietly)
        return running

    async def _compute(self, vault: Vault, row: RecordingRow) -> Waveform:
        async with self._slots:
            found = await asyncio.to_thread(compute, vault, row)
        self._keep(row.recording_id, found)
        return found

    def _keep(self, rid: str, found: Waveform) -> None:
        self._cache[rid] = found
        self._cache.move_to_end(rid)
        while len(self._cache) > CACHED:
            self._cache.popitem(last=False)


def _quietly(task: asyncio.Task[Waveform]) -> None:
    """A computation that failed is logged here too (one computed ahead has nobody
    waiting for it; the player's request gets the error)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("waveform_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")


async def waveform(
    service: AccessService, request: apb.RecordingRequest, context: Context
) -> apb.WaveformView:
    grant = await service._gate(context, Operation.PLAY, request, request.recording_id)
    row = grant.row
    assert row is not None
    found = await service.waveforms.of(service.vault, row)
    await service._audit(grant.event(row.recording_id, "waveform"))
    return apb.WaveformView(duration_ms=found.duration_ms, left=found.left, right=found.right)


def compute(vault: Vault, row: RecordingRow) -> Waveform:
    frames = max(SLICES, row.duration_ms * RATE // 1000)
    per_slice = -(-frames // SLICES)  # frames in one slice (the last may be shorter)
    decoder = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-i", "pipe:0", "-vn", "-ac", "2", "-ar", str(RATE),
         "-f", "s16le", "pipe:1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert decoder.stdin is not None and decoder.stdout is not None
    failed: list[BaseException] = []
    feeder = threading.Thread(
        target=_feed,
        args=(vault.read(row.recording_id, row.blob_key), decoder, failed),
        daemon=True,
    )
    feeder.start()
    timer = threading.Timer(TIMEOUT_S, decoder.kill)
    timer.start()
    left, right, seen = bytearray(), bytearray(), 0
    try:
        for block in _blocks(decoder.stdout, per_slice * 4):
            samples = array.array("h", block)
            if sys.byteorder != "little":
                samples.byteswap()
            left.append(_level(samples[0::2]))
            right.append(_level(samples[1::2]))
            seen += len(samples) // 2
    finally:
        timer.cancel()
        decoder.stdout.close()
        code = decoder.wait()
        feeder.join(5)
    if failed:
        raise failed[0]  # the vault's error (a shredded key, a damaged blob): not a waveform
    if code != 0 or not seen:
        raise WaveformError(f"ffmpeg could not decode recording {row.recording_id} ({code})")
    return Waveform(seen * 1000 // RATE, bytes(left), bytes(right))


def _feed(
    chunks: Iterator[bytes], decoder: subprocess.Popen[bytes], failed: list[BaseException]
) -> None:
    assert decoder.stdin is not None
    try:
        for data in chunks:
            decoder.stdin.write(data)
    except (BrokenPipeError, OSError):
        pass  # ffmpeg stopped early (killed, or a bad file): the reader says so
    except Exception as exc:  # noqa: BLE001 - handed to the caller's thread
        failed.append(exc)
        decoder.kill()
    finally:
        with contextlib.suppress(OSError):
            decoder.stdin.close()


def _blocks(stream: object, size: int) -> Iterator[bytes]:
    read = stream.read  # type: ignore[attr-defined]
    while True:
        block = read(size)
        if len(block) < 4:
            return
        yield block[: len(block) - len(block) % 4]


def _level(samples: array.array[int]) -> int:
    if not samples:
        return 0
    top, bottom = max(samples), min(samples)
    peak = top if top >= -bottom else -bottom
    return min(255, peak * 255 // 32767)
