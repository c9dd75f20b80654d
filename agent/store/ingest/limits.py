"""Per-site bounds on what agents can hold open in the store: concurrent uploads, and
bytes of partial uploads (``partials``: in ``incoming/`` or the shared bucket; one
agent certificate must not exhaust the store's file descriptors or disk for every
other site).

An upload holds a slot of its site from its manifest to its end. It reserves its
whole manifest size against the site's byte budget for as long as it runs (the part
can grow to that); once it ends without its finish, the part's real size counts until
it is resumed, committed or removed (by age, ``Partials.remove_stale``). The counts
live in memory, rebuilt from the partial uploads at start; parts removed behind the
service's back (or kept by another replica) are noticed by a recount before anything
is refused for bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from agent import logs
from agent.store.ingest.partials import Partials

log = logs.get_logger(__name__)


class LimitExceeded(Exception):
    """A site is at one of its caps; the message says which."""


@dataclass(frozen=True)
class Limits:
    uploads_per_site: int = 16
    incoming_bytes_per_site: int = 16 * 1024**3


class UploadLimits:
    def __init__(self, partials: Partials, limits: Limits) -> None:
        self.partials = partials
        self.limits = limits
        self._lock = threading.Lock()
        self._active: dict[str, dict[str, int]] = {}  # site → {stream: bytes reserved}
        self._parts = partials.holdings()  # idle partial uploads
        self._streams = itertools.count()

    def active(self, site: str) -> int:
        with self._lock:
            return len(self._active.get(site, {}))

    def bytes_held(self, site: str) -> int:
        with self._lock:
            return self._held(site)

    def _held(self, site: str) -> int:
        idle = sum(size for s, size in self._parts.values() if s == site)
        return idle + sum(self._active.get(site, {}).values())

    @contextlib.contextmanager
    def upload(self, site: str, recording_id: str, size: int) -> Iterator[None]:
        """Hold a slot and ``size`` bytes of ``site`` for one stream, or LimitExceeded.
        When the stream ends, what it left in ``incoming/`` counts for the site."""
        stream = f"{recording_id}#{next(self._streams)}"
        self._take(site, recording_id, stream, size)
        try:
            yield
        finally:
            left = self.partials.held_bytes(recording_id)
            with self._lock:
                self._active.get(site, {}).pop(stream, None)
                if not self._active.get(site):
                    self._active.pop(site, None)
                if left:
                    self._parts[recording_id] = (site, left)

    def _take(self, site: str, recording_id: str, stream: str, size: int) -> None:
        with self._lock:
            uploads = self._active.setdefault(site, {})
            if len(uploads) >= self.limits.uploads_per_site:
                raise LimitExceeded(
                    f"site {site!r} has {len(uploads)} uploads in progress, the most this "
                    "store takes at once from one site; retry when one has finished"
                )
            if self._over(site, recording_id, size):
                self._parts = self.partials.holdings()  # removed behind our back?
                if self._over(site, recording_id, size):
                    raise LimitExceeded(
                        f"site {site!r} holds {self._held(site)} bytes of unfinished uploads; "
                        f"with {size} more it would pass its {self.limits.incoming_bytes_per_site}"
                        " bytes; finish or abandon uploads first"
                    )
            self._parts.pop(recording_id, None)
            uploads[stream] = size

    def _over(self, site: str, recording_id: str, size: int) -> bool:
        mine = self._parts.get(recording_id, (site, 0))[1]
        return self._held(site) - mine + size > self.limits.incoming_bytes_per_site
