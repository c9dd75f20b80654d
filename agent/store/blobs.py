"""Blob storage for recording audio: one object per recording, written once.

The embedded default is a directory tree; each write lands under a temporary name, is
fsynced, and appears with one rename.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from agent.capture import fsync_dir


class Blobs(Protocol):
    def put_file(self, key: str, source: Path) -> None: ...

    def read(self, key: str, chunk_bytes: int = 256 * 1024) -> Iterator[bytes]: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...


class FileBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad blob key {key!r}")
        return self.root / key[:2] / key

    def put_file(self, key: str, source: Path) -> None:
        """Move (or copy, across file systems) ``source`` into place durably."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{key}.tmp")
        try:
            os.replace(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def read(self, key: str, chunk_bytes: int = 256 * 1024) -> Iterator[bytes]:
        with self._path(key).open("rb") as fh:
            while chunk := fh.read(chunk_bytes):
                yield chunk

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()
