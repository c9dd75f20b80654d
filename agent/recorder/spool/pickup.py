"""Spool pickup: recordings the PBX made itself (Asterisk ``MixMonitor``, FreeSWITCH
``record_session``) become captures in ``captures/ready/<id>/`` for finalize.

The sidecar format and the WAV files accepted: ``agent.recorder.spool.files``.

**Complete** — a file is taken when nothing has written it for ``settle`` seconds and
it is not open for writing: a create/modify event without the matching close-after-
write (``IN_CLOSE_WRITE``) or moved-in event means a writer still holds it, unless it
stayed silent for ``orphan_timeout`` (a dead writer; a WAV header without sizes is
then read to end of file and flagged ``incomplete``). Events only trigger checks; the
start-up scan and the periodic rescan apply the same rule to what events missed.

**Dedup** — ``<data_dir>/spool-index.sqlite3`` keeps every file handled (name, mtime,
size) and every recording taken (hashed call id, sha256 of the audio samples). The
same audio samples delivered again, under any name or call id, are a duplicate; the
same call id with different audio is a second recording (logged).

**Owned** — with ``owned = true`` the sidecar and audio of a recording are deleted
once finalize has put it into ``outbox/<id>`` (or the store already acknowledged it),
and only if they are unchanged since they were taken. A recording finalize had to
quarantine keeps its source files. Without ``owned`` nothing in the spool is deleted.

**Quarantine** — what cannot be taken gets ``quarantine/spool-<time>-<rand>/`` with
copies of its regular audio files, the sidecar with the customer masked and digit
runs redacted, and ``<entry>.reason``; the originals stay in the spool (and are not
looked at again until they change). The full number exists only in memory here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent import logs
from agent.capture import (
    CaptureMeta,
    Employee,
    Flag,
    fsync_dir,
    iso_ms,
    new_recording_id,
    write_meta,
)
from agent.config import AgentConfig, SpoolConfig
from agent.directory import LiveDirectory
from agent.privacy import Protector
from agent.recorder.parties import PartyRules, classify_headers
from agent.recorder.spool.files import (
    AUDIO_SUFFIX,
    SIDECAR_SUFFIX,
    Converted,
    Sidecar,
    SpoolChanged,
    SpoolError,
    call_ref,
    convert,
    current_keys,
    lstat_or_none,
    quarantine_copy,
    read_sidecar,
    stat_key,
)
from agent.recorder.spool.index import SpoolIndex, Stat, index_key
from agent.recorder.spool.pauses import as_pauses, silence
from agent.recorder.spool.release import release_owned

log = logs.get_logger(__name__)

EVENT_CAPACITY = 10_000


# ---------------------------------------------------------------- the loop


class _Events(FileSystemEventHandler):
    """Watchdog adapter: events become (kind, name) on a bounded queue, nothing more.
    A file moved in from elsewhere arrives as "created" (inotify's unpaired
    IN_MOVED_TO); only a write ("modified") marks a file as open for writing."""

    def __init__(self, root: Path, put: Callable[[str, str], None]) -> None:
        self.root = root
        self.put = put

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        name = Path(str(event.src_path)).name
        kind = event.event_type
        if kind == "moved":
            self.put("gone", name)
            dest = Path(str(event.dest_path))
            if dest.parent == self.root:
                self.put("closed", dest.name)
        elif kind == "modified":
            self.put("writing", name)
        elif kind in ("closed", "created"):
            self.put("closed", name)
        elif kind == "deleted":
            self.put("gone", name)


class SpoolPickup:
    """The spool loop: ``start()``, ``stop()``, ``join(timeout)``, ``is_alive()``.

    One thread owns all state (the index, what is open for writing, what is due to
    be looked at when); the watchdog handler only feeds it events."""

    def __init__(self, config: AgentConfig, protector: Protector, directory: LiveDirectory) -> None:
        if config.spool is None:
            raise ValueError("no [spool] section in the config")
        self.config = config
        self.spool: SpoolConfig = config.spool
        self.root = self.spool.dir
        self.protector = protector
        self.directory = directory
        self.rules = PartyRules.build(protector, config.service_numbers)
        self.ready_dir = config.captures_dir / "ready"
        self.staging_dir = config.captures_dir / "spool"
        self.stop_event = threading.Event()
        self._events: queue.Queue[tuple[str, str]] = queue.Queue(maxsize=EVENT_CAPACITY)
        self._overflow = threading.Event()
        self._writing: dict[str, float] = {}  # name → monotonic time of the last write
        self._due: dict[str, float] = {}  # sidecar or audio name → when to look again
        self._waiting: dict[str, str] = {}  # audio name → the sidecar that names it
        self._pending: list[tuple[str, list[Stat]]] = []  # owned, not yet released
        self._index: SpoolIndex | None = None
        self._observer = Observer()
        self._thread = threading.Thread(target=self._run, name="spool", daemon=True)
        self._reload = threading.Event()
        self.taken = 0

    @classmethod
    def from_config(cls, config: AgentConfig) -> SpoolPickup:
        """With the agent's keys and a live directory (SIGHUP reloads it)."""
        protector = Protector.load(
            config.privacy.default_region, config.privacy.seal_public_key_file
        )
        return cls(config, protector, LiveDirectory(config.directory_file))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"[spool] dir = {str(self.root)!r}: not a directory")
        for path in (self.ready_dir, self.staging_dir, self.config.quarantine_dir):
            path.mkdir(parents=True, exist_ok=True)
        key = index_key(self.config.data_dir / "spool-index.key")
        self._index = SpoolIndex(
            self.config.data_dir / "spool-index.sqlite3",
            lambda name: hmac.new(key, name.encode(), hashlib.sha256).hexdigest()[:32],
        )
        self._recover_staging()
        self._index.prune({p.name for p in self.root.iterdir()})
        self._pending = self._index.pending()
        self._observer.schedule(_Events(self.root, self._put), str(self.root), recursive=False)
        self._observer.start()
        self._thread.start()
        log.info(
            "spool_started",
            dir=self.root,
            owned=self.spool.owned,
            settle_s=round(self.spool.settle_s, 1),
            orphan_timeout_s=round(self.spool.orphan_timeout_s),
            rescan_s=round(self.spool.rescan_s),
            pending_release=len(self._pending),
        )

    def stop(self) -> None:
        self.stop_event.set()
        self._observer.unschedule_all()
        self._observer.stop()

    def join(self, timeout: float | None = None) -> None:
        for thread, wait in ((self._thread, timeout), (self._observer, 1.0)):
            if thread.ident is not None:  # started (start() may have failed half-way)
                thread.join(wait)
        if self._index is not None and not self._thread.is_alive():
            self._index.close()
            self._index = None

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def reload_directory(self) -> None:
        """Ask the loop to reload the directory (safe from a signal handler)."""
        self._reload.set()

    def _put(self, kind: str, name: str) -> None:
        if name.startswith("."):
            return
        try:
            self._events.put_nowait((kind, name))
        except queue.Full:
            self._overflow.set()  # the next loop turn rescans instead

    @property
    def index(self) -> SpoolIndex:
        if self._index is None:
            raise RuntimeError("SpoolPickup.start() has not run")
        return self._index

    def _recover_staging(self) -> None:
        """A capture staged before a crash: finish it if the index took it, else drop it."""
        for staged in sorted(p for p in self.staging_dir.iterdir() if p.is_dir()):
            if self.index.is_taken(staged.name):
                staged.rename(self.ready_dir / staged.name)
                log.warning("spool_staging_recovered", recording_id=staged.name)
            else:
                shutil.rmtree(staged)
        fsync_dir(self.ready_dir)

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        next_scan = 0.0
        next_release = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_scan or self._overflow.is_set():
                self._overflow.clear()
                self._scan()
                next_scan = now + self.spool.rescan_s
            wake = min([next_scan, *self._due.values()])
            self._drain(max(0.0, min(wake - time.monotonic(), 0.5)))
            self._run_due()
            if self._reload.is_set():
                self._reload.clear()
                self.directory.reload()
            if self._pending and time.monotonic() >= next_release:
                self._pending = release_owned(self._pending, self.index, self.root, self.config)
                next_release = time.monotonic() + min(1.0, self.spool.settle_s)

    def _drain(self, timeout: float) -> None:
        try:
            kind, name = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        for _ in range(EVENT_CAPACITY):
            self._on_event(kind, name)
            try:
                kind, name = self._events.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, kind: str, name: str) -> None:
        now = time.monotonic()
        if kind == "writing":
            self._writing[name] = now
            return
        self._writing.pop(name, None)
        if kind == "gone":
            return
        target = self._waiting.get(name, name)
        if target.endswith(SIDECAR_SUFFIX):
            self._due[target] = min(self._due.get(target, now + 3600), now + self.spool.settle_s)

    def _scan(self) -> None:
        try:
            entries = [e for e in os.scandir(self.root) if not e.name.startswith(".")]
        except OSError as exc:
            log.error("spool_scan_failed", dir=self.root, error=exc.strerror)
            return
        present = {e.name for e in entries}
        for table in (self._writing, self._due, self._waiting):
            for gone in [n for n in table if n not in present]:
                table.pop(gone, None)
        now = time.monotonic()
        for e in entries:
            if e.name.endswith((SIDECAR_SUFFIX, AUDIO_SUFFIX)):
                self._due[e.name] = now  # every rescan looks again (handled: one query)

    def _run_due(self) -> None:
        now = time.monotonic()
        due = sorted((t, not n.endswith(SIDECAR_SUFFIX), n) for n, t in self._due.items())
        for when, _, name in due:
            if when > now or self.stop_event.is_set():
                return
            del self._due[name]
            try:
                retry = self._look_at(name)
            except OSError as exc:  # ours (disk full, permissions): try again later
                log.error("spool_failed", file=name, error=str(exc), action="retry")
                retry = time.monotonic() + self.spool.rescan_s
            if retry is not None:
                self._due[name] = retry

    def _look_at(self, name: str) -> float | None:
        """Take, quarantine or wait for one spool file; returns when to look again."""
        st = lstat_or_none(self.root / name)
        if st is None or self.index.is_handled(stat_key(name, st)):
            return None
        wait = self._unsettled(name, st)
        if wait > 0:
            return time.monotonic() + wait
        if not name.endswith(SIDECAR_SUFFIX):
            return self._orphan_audio(name, st)
        try:
            return self._sidecar(name, st)
        except SpoolError as exc:
            self._quarantine(str(exc), name, [], [stat_key(name, st)])
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad entry never stops the loop
            log.error("spool_error", file=name, error=f"{type(exc).__name__}: {exc}")
            self._quarantine(
                f"unexpected error: {type(exc).__name__}", name, [], [stat_key(name, st)]
            )
        return None

    def _unsettled(self, name: str, st: os.stat_result) -> float:
        """Seconds until ``name`` counts as complete (0: it is)."""
        quiet = time.time() - st.st_mtime
        if name in self._writing:  # open for writing, unless silent long enough to be dead
            return max(0.0, self.spool.orphan_timeout_s - quiet)
        return max(0.0, self.spool.settle_s - quiet)

    def _orphan_audio(self, name: str, st: os.stat_result) -> float | None:
        if name in self._waiting:
            return None  # its sidecar is looked at; it will take or quarantine it
        quiet = time.time() - st.st_mtime
        if quiet < self.spool.orphan_timeout_s:
            return time.monotonic() + self.spool.orphan_timeout_s - quiet
        self._quarantine(
            f"no sidecar names this audio within orphan_timeout "
            f"({self.spool.orphan_timeout_s:.0f}s)",
            None,
            [name],
            [stat_key(name, st)],
        )
        return None

    # ------------------------------------------------------------ one recording

    def _sidecar(self, name: str, st: os.stat_result) -> float | None:
        car = read_sidecar(self.root / name)
        keys, waits, missing = [stat_key(name, st)], [0.0], False
        for audio in car.files:
            self._waiting[audio] = name
            ast = lstat_or_none(self.root / audio)
            if ast is None:
                missing = True
                continue
            keys.append(stat_key(audio, ast))
            if not stat.S_ISREG(ast.st_mode):
                self._quarantine(
                    f"audio {audio!r} is not a regular file (symlinks escape)",
                    name,
                    car.files,
                    keys,
                )
                return None
            waits.append(self._unsettled(audio, ast))
        if missing:
            waits.append(self.spool.orphan_timeout_s - (time.time() - st.st_mtime))
            if waits[-1] <= 0:
                timeout = self.spool.orphan_timeout_s
                self._quarantine(
                    f"audio never arrived within orphan_timeout ({timeout:.0f}s)",
                    name,
                    car.files,
                    keys,
                )
                return None
        if max(waits) > 0:
            return time.monotonic() + min(w for w in waits if w > 0)
        try:
            self._take(name, car, keys)
        except SpoolChanged:  # still being written after all: look again later
            return time.monotonic() + self.spool.settle_s
        except SpoolError as exc:  # the audio cannot be read
            self._quarantine(str(exc), name, car.files, keys)
        for audio in car.files:
            self._waiting.pop(audio, None)
        return None

    def _take(self, name: str, car: Sidecar, keys: list[Stat]) -> None:
        rid = new_recording_id()
        staging = self.staging_dir / rid
        staging.mkdir()
        try:
            converted = convert(self.root, car, staging)
            if current_keys(self.root, keys) != keys:
                raise SpoolChanged(name)
            ref = call_ref(car.call_id)
            earlier = self.index.find(converted.sha256)
            if earlier is not None:
                shutil.rmtree(staging)
                self.index.duplicate(earlier, keys, self.spool.owned)
                self._pending = self.index.pending()
                log.info("spool_duplicate", call_ref=ref, of=earlier, sidecar=name)
                return
            if (same := self.index.same_call(ref)) is not None:
                log.warning("spool_same_call_id", call_ref=ref, earlier=same, action="take")
            meta = self._meta(rid, car, converted, ref)
            for leg in converted.legs:  # the PBX's pauses: silence, whatever it wrote
                silence(staging / leg, car.started_at, car.pauses)
            write_meta(staging, meta)
            fsync_dir(staging)
            self.index.take(rid, ref, converted.sha256, keys, self.spool.owned)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(self.ready_dir / rid)
        fsync_dir(self.ready_dir)
        if self.spool.owned:
            self._pending.append((rid, keys))
        self.taken += 1
        _log_taken(meta, car.layout, converted.duration_s)

    def _meta(self, rid: str, car: Sidecar, converted: Converted, ref: str) -> CaptureMeta:
        parties = classify_headers(
            car.customer, car.employee, car.service, self.directory.current, self.rules
        )
        ended = car.ended_at or car.started_at + dt.timedelta(seconds=converted.duration_s)
        joined = iso_ms(car.started_at)
        flags = (*parties.flags, *((Flag.INCOMPLETE,) if converted.incomplete else ()))
        return CaptureMeta(
            recording_id=rid,
            site=self.config.site,
            source="spool",
            call_ref=ref,
            direction=car.direction,
            started_at=joined,
            ended_at=iso_ms(ended),
            service_number=parties.service_number,
            customer=parties.customer,
            employees=tuple(
                Employee(e.id, e.name, e.aor, joined, e.team) for e in parties.employees
            ),
            legs=converted.legs,
            flags=tuple(dict.fromkeys((*flags, *((Flag.PAUSED,) if car.pauses else ())))),
            pauses=as_pauses(car.pauses),
        )

    def _quarantine(
        self, reason: str, sidecar: str | None, audio: Iterable[str], keys: list[Stat]
    ) -> None:
        files = list(audio)
        entry = quarantine_copy(
            self.root, self.config.quarantine_dir, reason, sidecar, files, self.protector
        )
        self.index.mark(keys, entry)
        for name in files:
            self._waiting.pop(name, None)
        log.error(
            "spool_quarantined",
            entry=entry,
            reason=reason,
            sidecar=sidecar or "-",
            audio_files=len(files),
        )


def _log_taken(meta: CaptureMeta, layout: str, audio_s: float) -> None:
    log.info(
        "spool_taken",
        recording_id=meta.recording_id,
        call_ref=meta.call_ref,
        layout=layout,
        customer=meta.customer.masked,
        employee=meta.employees[0].name if meta.employees else "unknown",
        direction=meta.direction.value,
        audio_s=round(audio_s, 1),
        flags=",".join(meta.flags) or "-",
    )
