"""The free-space floor of the data disk (``[agent] min_free``), as a worker sees it.

Below the floor a worker refuses new calls with 503 before anything is answered (the
front tries the next worker, then tells the SRC 503): a call the SRC was told is
recorded must have room to be. Calls in progress go on into the space the floor keeps
for them. The free bytes are a gauge, refusals a counter, and crossing the floor either
way is one log line.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent import logs, metrics
from agent.config import FreeSpaceFloor

log = logs.get_logger("agent.recorder.sip")


def free_bytes(path: Path) -> tuple[int, int]:
    """(free bytes for an unprivileged writer, file system size) of ``path``'s disk."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


class DiskGuard:
    def __init__(self, path: Path, floor: FreeSpaceFloor, worker: int) -> None:
        self.path = path
        self.floor = floor
        self.worker = worker
        self.below = False

    def room_for_a_call(self) -> bool:
        """Look now; False (and counted) when a new call must be refused."""
        if self.check():
            return True
        metrics.DISK_FULL_REFUSALS.inc()
        return False

    def check(self) -> bool:
        """Update the gauge; log when the floor is crossed. True while above it."""
        try:
            free, total = free_bytes(self.path)
        except OSError as exc:
            log.warning("disk_check_failed", path=str(self.path), error=exc.strerror)
            return True  # can't tell: let the call try (its own writes are guarded)
        floor = self.floor.floor(total)
        metrics.DISK_FREE_BYTES.set(free)
        below = free < floor
        if below != self.below:
            self.below = below
            fields = {"worker": self.worker, "free_bytes": free, "min_free_bytes": floor}
            if below:
                log.warning("disk_below_floor", action="refuse_new_calls", **fields)
            else:
                log.info("disk_above_floor", action="accept_new_calls", **fields)
        return not below


LEG_BYTES_PER_S = 16000  # a leg: 8 kHz, 16-bit mono
STALL_BYTES = 2 * LEG_BYTES_PER_S  # a leg this far behind its call, and not growing


def stalled_legs(legs: list[Path], sizes: dict[str, int], expected_bytes: float) -> list[str]:
    """Legs that did not grow since the last look (``sizes``, updated here) and hold
    less than ``expected_bytes`` by STALL_BYTES: their writes fail."""
    stalled = []
    for leg in legs:
        try:
            size = leg.stat().st_size
        except OSError:
            size = 0
        if size == sizes.get(leg.name) and size < expected_bytes - STALL_BYTES:
            stalled.append(leg.name)
        sizes[leg.name] = size
    return stalled


def log_recording_stopped(
    recording_id: str, directory: Path, stalled: list[str], sizes: dict[str, int]
) -> None:
    try:
        free: int | None = free_bytes(directory)[0]
    except OSError:
        free = None
    seconds = min(max(0, sizes.get(leg, 0) - 44) for leg in stalled) / LEG_BYTES_PER_S
    log.warning(
        "recording_stopped", recording_id=recording_id, reason="legs_not_growing",
        legs=",".join(stalled), audio_s=round(seconds, 1), free_bytes=free, call="continues",
    )  # fmt: skip
