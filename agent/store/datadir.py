"""One store process per data directory: an exclusive ``flock`` on
``<data_dir>/store.lock``, held for the life of the process (the kernel drops it when
the process dies, however it dies). A second ``callrec store`` on the same directory
would share ``console.sock``, ``incoming/`` partial uploads and the SQLite catalog's
files; it refuses to start instead, naming the process that holds the lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.config import ConfigError


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "store.lock"
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"[store] data_dir = {str(self.path.parent)!r}: in use by another store "
                f"process (pid {holder}); one store per data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
