"""Backpressure: say loudly when the outbox grows, never stop recording.

``OutboxMonitor`` measures the outbox every ``interval`` (entries, bytes, age of the
oldest), sets the gauges, and while the outbox is past ``[uplink] outbox_warn_bytes``
or ``outbox_warn_age`` logs one warning per check. Recording and finalizing go on: the
disk is the buffer, and the operator is told before it fills.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agent import logs, metrics
from agent.recorder.uplink.outbox import Outbox

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class OutboxLevel:
    entries: int
    bytes: int
    oldest_s: float
    over: tuple[str, ...]  # which limits are exceeded: "bytes", "age"


class OutboxMonitor:
    def __init__(
        self, outbox: Outbox, warn_bytes: int, warn_age_s: float, interval_s: float
    ) -> None:
        self.outbox = outbox
        self.warn_bytes = warn_bytes
        self.warn_age_s = warn_age_s
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-monitor", daemon=True)
        self._was_over = False
        self.last = OutboxLevel(0, 0, 0.0, ())  # the latest check (for STATUS=)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> OutboxLevel:
        entries, size, oldest = self.outbox.stats()
        over = tuple(
            name
            for name, exceeded in (
                ("bytes", size > self.warn_bytes),
                ("age", oldest > self.warn_age_s),
            )
            if exceeded
        )
        level = OutboxLevel(entries, size, oldest, over)
        self.last = level
        metrics.OUTBOX_ENTRIES.set(entries)
        metrics.OUTBOX_BYTES.set(size)
        metrics.OUTBOX_OLDEST_SECONDS.set(oldest)
        metrics.OUTBOX_OVER_LIMIT.set(1 if over else 0)
        self._report(level)
        return level

    def _report(self, level: OutboxLevel) -> None:
        if level.over:
            log.warning(
                "outbox_backpressure",
                entries=level.entries,
                bytes=level.bytes,
                oldest_s=round(level.oldest_s),
                over=",".join(level.over),
                warn_bytes=self.warn_bytes,
                warn_age_s=round(self.warn_age_s),
                action="keep_recording",
                hint="the store is not taking recordings fast enough: check the uplink's "
                "upload_retry lines and the store",
            )
        elif self._was_over:
            log.info(
                "outbox_backpressure_cleared",
                entries=level.entries,
                bytes=level.bytes,
                oldest_s=round(level.oldest_s),
            )
        self._was_over = bool(level.over)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.check()
            except OSError:  # the outbox changing under the scan: next interval
                log.exception("outbox_check_failed")
