"""Background loops that work through the entries of one directory.

A ``DirectoryQueue`` is fed three ways, so nothing is missed: a watchdog observer
(an entry is created or moved in), a scan at start-up (what arrived while we were
down), and a periodic rescan (events the kernel dropped). Workers take entry names
from a bounded queue with a timeout; one bad entry is logged and the loop goes on.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import DirCreatedEvent, DirMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent import logs

log = logs.get_logger(__name__)


class _Handler(FileSystemEventHandler):
    def __init__(self, offer: Callable[[str], None]) -> None:
        self.offer = offer

    def on_created(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirCreatedEvent):
            self.offer(Path(str(event.src_path)).name)

    def on_moved(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirMovedEvent):
            self.offer(Path(str(event.dest_path)).name)


class DirectoryQueue:
    """Offers each visible sub-directory of ``root`` (names not starting with '.') to
    ``handle`` on ``workers`` threads. ``handle`` returns normally when the entry is
    done; an exception is logged with the entry's name and the entry is offered again
    on the next rescan."""

    def __init__(
        self,
        name: str,
        root: Path,
        handle: Callable[[str], None],
        workers: int = 1,
        rescan_s: float = 30.0,
        capacity: int = 10_000,
    ) -> None:
        self.name = name
        self.root = root
        self.handle = handle
        self.rescan_s = rescan_s
        self.stop_event = threading.Event()
        self._queue: queue.Queue[str] = queue.Queue(maxsize=capacity)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        self._threads.append(
            threading.Thread(target=self._rescan, name=f"{name}-scan", daemon=True)
        )
        self._observer = Observer()
        self._idle = threading.Condition(self._lock)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._observer.schedule(_Handler(self.offer), str(self.root), recursive=False)
            self._observer.start()
        except OSError as exc:  # e.g. out of inotify watches: the rescans still work
            log.warning(
                f"{self.name}_watch_unavailable",
                path=self.root,
                error=str(exc),
                fallback=f"rescan_every_{self.rescan_s:.0f}s",
            )
        self.scan()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._observer.unschedule_all()
        self._observer.stop()

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._observer.ident is not None:
            self._observer.join(1.0)

    def is_alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def offer(self, entry: str) -> None:
        if entry.startswith(".") or self.stop_event.is_set():
            return
        with self._lock:
            if entry in self._pending:
                return
            self._pending.add(entry)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            with self._lock:
                self._pending.discard(entry)
            # The rescan offers it again once the queue drains.

    def scan(self) -> int:
        """Offer every entry, oldest first (a backlog drains in the order it came)."""
        entries: list[tuple[float, str]] = []
        try:
            for path in self.root.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if path.is_dir():
                        entries.append((path.stat().st_mtime, path.name))
        except FileNotFoundError:
            return 0
        names = [name for _, name in sorted(entries)]
        for entry in names:
            self.offer(entry)
        return len(names)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending (for shutdown and tests)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.2))
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _work(self) -> None:
        while not self.stop_event.is_set():
            try:
                entry = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if (self.root / entry).is_dir():
                    self.handle(entry)
            except Exception:  # one bad entry never kills the loop
                log.exception(f"{self.name}_failed", entry=entry)
            finally:
                with self._idle:
                    self._pending.discard(entry)
                    self._idle.notify_all()

    def _rescan(self) -> None:
        while not self.stop_event.wait(self.rescan_s):
            self.scan()


# Events that can change a file's content. Not "opened" or "closed_no_write": whoever
# is told of a change reads the file, and reacting to reads made each reload trigger
# the next (measured with a watcher per worker: ~6 reloads/s in every one).
_CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})


class FileWatcher:
    """Calls ``on_change`` when one file changes (watchdog on its parent directory,
    since editors and config management replace files by rename). Bursts of events
    are coalesced: ``on_change`` runs once the writer has been quiet ``debounce_s``."""

    def __init__(self, path: Path, on_change: Callable[[], None], debounce_s: float = 0.3) -> None:
        self.path = path
        self.on_change = on_change
        self.debounce_s = debounce_s
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._observer = Observer()
        self._thread = threading.Thread(target=self._run, name="file-watch", daemon=True)

    def start(self) -> None:
        name = self.path.name
        changed = self._changed

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                paths = (event.src_path, getattr(event, "dest_path", ""))
                if event.event_type in _CHANGES and any(
                    Path(str(p)).name == name for p in paths if p
                ):
                    changed.set()

        self._observer.schedule(_Handler(), str(self.path.parent), recursive=False)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        self._observer.unschedule_all()
        self._observer.stop()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._observer.ident is not None:
            self._observer.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.is_set():
                return
            # Let the writer finish (several events per save), then report once.
            while self._changed.is_set():
                self._changed.clear()
                self._stop.wait(self.debounce_s)
            try:
                self.on_change()
            except Exception:  # the watcher outlives one failed reaction
                log.exception("file_change_failed", path=self.path)
