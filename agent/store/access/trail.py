"""The audit trail of the people's port's unauthenticated failures, aggregated so that
nobody outside can grow the audit table or the log at will (``throttle``).

Nobody known (no token, a malformed or unknown one): one entry per source address a
minute. A real token's holder (revoked, expired, left the directory): up to 60 a
minute per source and person. The rest are counted into one ``repeats=N`` entry, written
with the source's next failure after the minute, by ``flush_due`` (checked at most every
few seconds, on any request), or by ``flush`` when the store stops.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from agent import logs
from agent.store.access.throttle import FailureThrottle, Summary, source_of
from agent.store.audit import chain as audit

log = logs.get_logger(__name__)

IDENTIFIED_BURST = 60
CHECK_EVERY_S = 5.0


class UnauthenticatedTrail:
    def __init__(self, write: Callable[[audit.Event], Awaitable[None]]) -> None:
        self.write = write
        self.throttle = FailureThrottle()
        self._checked = time.monotonic()

    async def admit(self, peer: str | None, actor: str) -> tuple[bool, str]:
        """Whether this failure is written (else only counted), and its source."""
        source = source_of(peer)
        identified = actor.startswith("person:")
        key, burst = (f"{source}/{actor}", IDENTIFIED_BURST) if identified else (source, 1)
        record, ended = self.throttle.admit(key, burst)
        if ended is not None:
            await self._summary(ended)
        return record, source

    async def _summary(self, summary: Summary) -> None:
        detail = (
            f"repeats={summary.suppressed} source={summary.source} window_s={summary.window_s:.0f}"
        )
        await self.write(
            audit.Event("anonymous", "authenticate", None, "", "unauthenticated", "", detail)
        )
        log.warning(
            "access_unauthenticated_repeats", source=summary.source, repeats=summary.suppressed
        )

    async def flush_due(self) -> None:
        """Write the counts of ended windows (checked at most every few seconds)."""
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return
        self._checked = now
        for summary in self.throttle.due():
            await self._summary(summary)

    async def flush(self) -> None:
        """Write every count still held (the store stops)."""
        for summary in self.throttle.drain():
            await self._summary(summary)
