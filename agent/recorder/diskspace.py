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
