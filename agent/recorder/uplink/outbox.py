"""The outbox: finished recordings waiting for the store's durable receipt.

``outbox/<id>/`` holds ``audio.<ext>`` and ``manifest.json``. An entry is removed only
after a receipt whose sha256 equals the manifest's: first renamed to ``.done-<id>``
(one atomic step, so a crash never leaves half an entry visible), then deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from agent.capture import fsync_dir
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.recorder.finalize import MANIFEST_FILE, audio_file_name


@dataclass(frozen=True)
class OutboxEntry:
    path: Path
    manifest: pb.Manifest

    @property
    def audio_path(self) -> Path:
        return self.path / audio_file_name(self.manifest.audio_format)


class Uploaded:
    """The last ``limit`` recordings that left the outbox with the store's receipt
    (recording id → hashed Call-ID), in memory: the control API answers 409 "ended"
    for them rather than 404."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._refs: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, recording_id: str, call_ref: str) -> None:
        with self._lock:
            self._refs[recording_id] = call_ref
            while len(self._refs) > self.limit:
                del self._refs[next(iter(self._refs))]

    def find(self, recording_id: str | None = None, call_ref: str | None = None) -> str | None:
        """The recording id if one uploaded lately matches."""
        with self._lock:
            if recording_id is not None:
                return recording_id if recording_id in self._refs else None
            return next((r for r, c in self._refs.items() if c == call_ref), None)


class Outbox:
    def __init__(self, root: Path) -> None:
        self.uploaded = Uploaded()
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".done-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def open(self, recording_id: str) -> OutboxEntry:
        path = self.root / recording_id
        manifest = json_format.Parse((path / MANIFEST_FILE).read_text(), pb.Manifest())
        return OutboxEntry(path, manifest)

    @contextlib.contextmanager
    def locked(self, recording_id: str, wait_s: float) -> Iterator[bool]:
        """Hold the entry's lock (flock on its directory) while a manifest is read and
        rewritten or an upload attempt runs; yields False if not got within ``wait_s``
        (and True when the entry is gone: the caller finds that out)."""
        try:
            fd = os.open(self.root / recording_id, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield True
            return
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.02)
            yield True
        finally:
            os.close(fd)  # releases the lock

    def remove(self, entry: OutboxEntry, receipt: pb.UploadReceipt) -> None:
        if receipt.sha256 != entry.manifest.sha256 or receipt.recording_id != entry.path.name:
            raise ValueError(
                f"receipt for {receipt.recording_id} sha256={receipt.sha256} does not match "
                f"the outbox entry's sha256={entry.manifest.sha256}; keeping it"
            )
        # Known as uploaded before it leaves: no moment where it is neither here nor there.
        self.uploaded.add(entry.manifest.recording_id, entry.manifest.call_ref)
        done = self.root / f".done-{entry.path.name}"
        entry.path.rename(done)
        fsync_dir(self.root)
        shutil.rmtree(done)

    def entries(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def stats(self) -> tuple[int, int, float]:
        """(entries, bytes, age of the oldest entry in seconds)."""
        count, size, oldest = 0, 0, time.time()
        for name in self.entries():
            path = self.root / name
            try:
                count += 1
                size += sum(f.stat().st_size for f in path.iterdir())
                oldest = min(oldest, path.stat().st_mtime)
            except FileNotFoundError:
                continue
        return count, size, (time.time() - oldest) if count else 0.0
