"""Who is writing what: ``flock`` locks that the kernel drops when their process dies,
however it dies (SIGKILL included), so a lock held means a live owner.

- A **capture** is owned by the worker recording it: ``<capture>/owner`` is locked for
  as long as the legs are written, and holds the worker's heartbeat (the last time it
  saw the call running), rewritten in place every second. Recovery never touches a
  capture whose owner lives, and reads the end of a dead owner's call from here and
  from the audio on disk, never from a file's mtime.
- A **worker slot** (``captures/active/w<N>.lock``) is held by worker N for its
  lifetime: a worker started while its predecessor still drains calls (the agent was
  killed and restarted) waits for the slot, and so for the SIP port, instead of
  failing on it or recovering captures still being written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

OWNER_FILE = "owner"
_HEARTBEAT_BYTES = 64  # written over the same bytes each time: no new block on a full disk


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _slot_file(active_dir: Path) -> Path:
    return active_dir.with_name(active_dir.name + ".lock")


def _held(path: Path) -> bool:
    """True if a live process holds ``path``'s lock (probing takes it for an instant)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not _lock(fd)
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got one


class CaptureOwner:
    """The recording worker's hold on one capture directory."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def claim(cls, directory: Path, now_iso: str) -> CaptureOwner:
        """Lock ``<directory>/owner`` and write the first heartbeat (this allocates the
        file's only block; an OSError here means the disk is full: don't answer)."""
        fd = os.open(directory / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if not _lock(fd):
                raise BlockingIOError(f"{directory.name}: capture owned by another process")
            owner = cls(fd)
            # Allocate the file's block now (the heartbeats rewrite it in place); no
            # fsync: it serves recovery after a process death, the page cache outlives that.
            os.pwrite(fd, b" " * _HEARTBEAT_BYTES, 0)
            owner.beat(now_iso)
        except BaseException:
            os.close(fd)
            raise
        return owner

    def beat(self, now_iso: str) -> None:
        """The call is still running at ``now_iso`` (in place; never raises)."""
        if self._fd is None:
            return
        line = f"{now_iso} pid={os.getpid()}".encode().ljust(_HEARTBEAT_BYTES - 1) + b"\n"
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, line, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def capture_owned(directory: Path) -> bool:
    """A live process is writing this capture."""
    return _held(directory / OWNER_FILE)


def last_heartbeat(directory: Path) -> str | None:
    """The last heartbeat (ISO time) a capture's owner wrote, if any."""
    try:
        text = (directory / OWNER_FILE).read_text(errors="replace")
    except OSError:
        return None
    first = text.split(maxsplit=1)
    return first[0] if first and first[0][:1].isdigit() else None


class WorkerSlot:
    """Worker N's exclusive hold on its slot (its SIP port, its active captures)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(
        cls,
        active_dir: Path,
        on_wait: Callable[[int | None, float], None],
        stop: Callable[[], bool],
        poll_s: float = 0.2,
    ) -> WorkerSlot | None:
        """Take the slot, waiting while a predecessor holds it (``on_wait(pid, seconds
        waited)`` at each look); None if ``stop()`` turned true meanwhile."""
        active_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(_slot_file(active_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        started = time.monotonic()
        while not _lock(fd):
            if stop():
                os.close(fd)
                return None
            on_wait(slot_holder(active_dir), time.monotonic() - started)
            time.sleep(poll_s)
        with contextlib.suppress(OSError):  # fixed width, in place: works on a full disk
            os.pwrite(fd, f"{os.getpid()}".encode().ljust(15) + b"\n", 0)
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def slot_held(active_dir: Path) -> bool:
    """A worker process (perhaps one of a killed agent) holds this slot."""
    return _held(_slot_file(active_dir))


def slot_holder(active_dir: Path) -> int | None:
    """The pid written by the slot's (last) holder."""
    try:
        return int(_slot_file(active_dir).read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None
