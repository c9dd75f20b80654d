"""Whether the store answers, as the upload workers see it, told to the operator once
per change instead of once per attempt.

While the store is down every upload worker retries every few seconds; a line per
attempt and entry would bury everything else. Instead:

- ``store_unreachable`` (warning; error when the store refuses this agent's
  certificate) at the first failed attempt, with its code and reason;
- ``store_still_unreachable`` (warning) at most every ``summary_every_s`` while it
  lasts: for how long, how many attempts failed, how many outbox entries are waiting;
- ``store_reachable`` (info) at the first answer again: how long it was down, how many
  attempts failed and how many entries waited (the most seen in the outbox).

Each attempt still logs ``upload_retry`` at debug level.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from agent import logs

log = logs.get_logger("agent.recorder.uplink.client")

# The store refuses this agent's certificate: an operator must act.
CONFIG_PROBLEMS = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


class StoreReachability:
    """Thread-safe: every upload worker reports its attempts' outcomes here."""

    def __init__(
        self,
        outbox_size: Callable[[], int],
        summary_every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox_size = outbox_size
        self.summary_every_s = summary_every_s
        self.clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self._failures = 0
        self._waited = 0  # the most outbox entries seen waiting during this outage
        self._summarised_at = 0.0

    def failed(self, recording_id: str, code: grpc.StatusCode, details: str) -> None:
        """An attempt found the store unreachable (or refusing this agent)."""
        with self._lock:
            now = self.clock()
            self._failures += 1
            waiting = self.outbox_size()
            self._waited = max(self._waited, waiting)
            if self.down_since is None:
                self.down_since = self._summarised_at = now
                log.log(
                    logging.ERROR if code in CONFIG_PROBLEMS else logging.WARNING,
                    "store_unreachable",
                    code=code.name,
                    reason=details[:200],
                    recording_id=recording_id,
                    entries_waiting=waiting,
                    action="keep_recording_retry_with_backoff",
                )
            elif now - self._summarised_at >= self.summary_every_s:
                self._summarised_at = now
                log.warning(
                    "store_still_unreachable",
                    for_s=round(now - self.down_since),
                    code=code.name,
                    reason=details[:200],
                    attempts=self._failures,
                    entries_waiting=waiting,
                )

    def answered(self) -> None:
        """An attempt reached the store (whatever it then said about the entry)."""
        with self._lock:
            if self.down_since is None:
                return
            log.info(
                "store_reachable",
                down_s=round(self.clock() - self.down_since, 1),
                attempts=self._failures,
                entries_waited=self._waited,
            )
            self.down_since = None
            self._failures = self._waited = 0
