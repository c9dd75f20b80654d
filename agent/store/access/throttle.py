"""Aggregation of repeated failures from one source (unauthenticated requests on the
people's port), so that nobody outside can grow the audit table or the log at will.

The first ``burst`` failures of a key (a source, or a source and a token's person) in
a window (60 s) are recorded at once; later ones in the same window are only counted.
When a window has ended, its count is handed out once (by the next ``admit`` of its
key, or ``due``) for one summary entry (``repeats=N``). Sources are the peer's address
without its port; past ``max_sources`` distinct sources in a window, the rest share
one bucket (``*``), so the table of counters is bounded too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 60.0
MAX_SOURCES = 4096
OVERFLOW = "*"


@dataclass
class _Window:
    started: float
    admitted: int = 1
    suppressed: int = 0


@dataclass(frozen=True)
class Summary:
    source: str
    suppressed: int
    window_s: float


def source_of(peer: str | None) -> str:
    """``ipv4:127.0.0.1:5555`` → ``127.0.0.1``; ``ipv6:[::1]:5555`` → ``::1``."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")[:64]
    return kind[:16] or "unknown"


class FailureThrottle:
    def __init__(
        self,
        window_s: float = WINDOW_S,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.max_sources = max_sources
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def admit(self, source: str, burst: int = 1) -> tuple[bool, Summary | None]:
        """Whether this failure should be recorded (else it is only counted), and the
        summary of this source's previous window when that one has just ended."""
        now = self.clock()
        with self._lock:
            window = self._windows.get(source)
            if window is None and len(self._windows) >= self.max_sources:
                source = OVERFLOW
                window = self._windows.get(source)
            if window is not None and now - window.started < self.window_s:
                if window.admitted < burst:
                    window.admitted += 1
                    return True, None
                window.suppressed += 1
                return False, None
            ended = None
            if window is not None and window.suppressed:
                ended = Summary(source, window.suppressed, self.window_s)
            self._windows[source] = _Window(now)
            return True, ended

    def due(self) -> list[Summary]:
        """Counts of windows that have ended (each handed out once)."""
        now = self.clock()
        out: list[Summary] = []
        with self._lock:
            for source, window in list(self._windows.items()):
                if now - window.started < self.window_s:
                    continue
                if window.suppressed:
                    out.append(Summary(source, window.suppressed, self.window_s))
                del self._windows[source]
        return out

    def drain(self) -> list[Summary]:
        """Every count not yet handed out, ended or not (at shutdown)."""
        with self._lock:
            out = [
                Summary(source, w.suppressed, self.window_s)
                for source, w in self._windows.items()
                if w.suppressed
            ]
            self._windows.clear()
        return out
