"""Group commit and running digests for live appends.

Every live call appends about once a second, so at a few hundred calls the store makes
hundreds of small catalog transactions a second. Each one's commit waits for the disk
(SQLite: the WAL's fsync, under the one write lock; PostgreSQL: its WAL flush), and
measured with 100 calls on 2 cores they queued behind each other: 70 % of an append's
time was waiting for the write lock. :class:`GroupCommit` lets the threads that wait
hand their rows to whichever thread is committing next, so one transaction (one fsync)
makes a whole group durable; every member learns its own outcome.

:class:`RunningDigests` keeps each live leg's sha256 as its appends commit here, so a
Finish reads back only what this store did not see (appends that landed on another
replica), not the whole call.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa

from agent import logs

log = logs.get_logger(__name__)

R = TypeVar("R")

MAX_GROUP = 256  # works in one transaction (a bound on its length, not a target)


@dataclass
class _Slot:
    work: Callable[[sa.Connection], Any]
    after: Callable[[Any], None] | None
    order: str
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class GroupCommit:
    """``run(work)`` from many threads: each ``work(conn)`` runs inside a transaction
    shared with the works that arrived while the previous group was committing.
    A work that raises ``refusal`` is refused alone (it must raise before writing);
    any other error fails the whole group (the transaction is gone), and every member
    raises it. ``after(result)`` runs once the group is durable, in commit order."""

    def __init__(
        self,
        engine: sa.Engine,
        refusal: type[Exception],
        max_group: int = MAX_GROUP,
    ) -> None:
        self._engine = engine
        self._refusal = refusal
        self._max = max_group
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._busy = False
        self.groups = 0  # committed groups (for tests)

    def run(
        self,
        work: Callable[[sa.Connection], R],
        after: Callable[[R], None] | None = None,
        order: str = "",
    ) -> R:
        """``order``: works run in this order within a group (the recording id: two
        replicas lock rows in the same order, so they never deadlock)."""
        slot = _Slot(work, after, order)
        with self._cond:
            self._queue.append(slot)
        while True:
            with self._cond:
                while not slot.done and self._busy:
                    self._cond.wait()
                if slot.done:
                    break
                self._busy = True  # this thread commits the next group (its own in it)
                group = self._queue[: self._max]
                del self._queue[: self._max]
            self._commit_group(group)
        if slot.error is not None:
            raise slot.error
        result: R = slot.result
        return result

    def _commit_group(self, group: list[_Slot]) -> None:
        settled = False
        try:
            self._transact(group)
            settled = True
            for slot in group:
                if slot.error is None and slot.after is not None:
                    try:
                        slot.after(slot.result)
                    except Exception:  # committed: the member must not raise
                        log.exception("group_commit_after_failed")
        finally:
            with self._cond:
                for slot in group:
                    if not settled and slot.error is None:
                        slot.error = RuntimeError("group commit interrupted")
                    slot.done = True
                self.groups += 1
                self._busy = False
                self._cond.notify_all()

    def _transact(self, group: list[_Slot]) -> None:
        try:
            with self._engine.begin() as conn:
                for slot in sorted(group, key=lambda s: s.order):
                    try:
                        slot.result = slot.work(conn)
                    except self._refusal as exc:
                        slot.error = exc
        except Exception as exc:  # noqa: BLE001 - every member raises it
            for slot in group:
                slot.error, slot.result = slot.error or exc, None


def chain_step(chain: Any, offset: int, blob_key: str) -> None:
    """A segment's identity into a leg's chain: blob keys are random per append and
    never reused, so two equal chains name the very same segments (same bytes)."""
    chain.update(f"{offset}:{blob_key};".encode())


@dataclass
class _Running:
    digest: Any  # hashlib's sha256 over the leg's first ``size`` bytes
    size: int
    chain: Any  # hashlib's sha256 over the segments it read (chain_step)


class RunningDigests:
    """Each live leg's sha256 over its first ``size`` bytes, in memory, for at most
    ``limit`` legs (the oldest go first: a Finish then reads the leg back). Whoever
    uses one checks its chain against the segments in the catalog: after a discard
    and a resend through another replica, the same offsets are other segments."""

    def __init__(self, limit: int = 8192) -> None:
        self._limit = limit
        self._legs: dict[tuple[str, str], _Running] = {}
        self._lock = threading.Lock()

    def extend(self, rid: str, leg: str, offset: int, data: bytes, blob_key: str) -> None:
        """A segment committed here: ``data`` at ``offset`` in ``blob_key``."""
        key = (rid, leg)
        with self._lock:
            running = self._legs.pop(key, None)
            if offset == 0:
                running = _Running(hashlib.sha256(), 0, hashlib.sha256())
            elif running is None or running.size != offset:
                return  # a piece landed elsewhere: the Finish reads the leg back
            running.digest.update(data)
            running.size += len(data)
            chain_step(running.chain, offset, blob_key)
            while len(self._legs) >= self._limit:
                self._legs.pop(next(iter(self._legs)))
            self._legs[key] = running

    def get(self, rid: str, leg: str) -> tuple[Any, int, str] | None:
        """(a copy of the digest, the bytes it covers, its chain's hex digest)."""
        with self._lock:
            running = self._legs.get((rid, leg))
            if running is None:
                return None
            return running.digest.copy(), running.size, running.chain.hexdigest()

    def forget(self, rid: str, legs: Sequence[str]) -> None:
        with self._lock:
            for leg in legs:
                self._legs.pop((rid, leg), None)
