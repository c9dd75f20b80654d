"""The sweeper: destroys every recording whose retention has run out, unless on hold.

Each destruction goes mark → shred key → delete blob → delete row:

1. *claim* (one transaction): mark a batch of expired, unheld rows
   (``destroy_reason``) and null their wrapped data keys. On PostgreSQL the batch is
   picked with ``FOR UPDATE SKIP LOCKED``, so sweepers on several hosts take disjoint
   batches; on SQLite the single ``UPDATE … RETURNING`` is atomic. Batches are taken
   oldest first, one expired range at a time, each starting where the last ended.
2. delete each blob (idempotent);
3. *finish* (one transaction): delete the marked rows whose blob is gone, their key
   rows, and append one audit event per row actually deleted (chained together by
   ``audit.append_events``) — in the same transaction, so a destruction is audited
   exactly once even when two sweepers race.

A kill between steps leaves marked rows; every run first finishes marked rows, so
nothing half-done outlives the next run. The audio is unreadable from step 1 on.
Then orphans: key rows without a recording row (an upload killed between writing its
blob and its row), abandoned partial writes in the blob store, and partial uploads (in
``incoming/``, and in the shared bucket, where every replica's sweeper removes them:
``s3_partials``), each older than the grace period.

Run inside the store (``SweeperLoop``, the default: ``[store] sweep_by = "store"``) or,
with ``sweep_by = "timer"``, as ``callrec sweep --once --timer`` from
callrec-sweep.timer; a timer run on a store that sweeps itself does nothing, so exactly
one scheduler is in charge. Each run without a failure records when it ended in
``<data_dir>/sweep-state.json`` (the store's /metrics reads it, whoever swept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import Counter, Gauge

from agent import logs
from agent.config import ConfigError, StoreConfig, load_store_config
from agent.privacy import KeyFileError
from agent.store.archive.vault import Vault, open_partials, open_storage
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, data_keys, recordings
from agent.store.ingest.partials import Partials, remove_stale_uploads
from agent.store.retention.schedule import datetime_to_ms, expired_ranges, ms_to_datetime

log = logs.get_logger(__name__)

DESTROYED = Counter(
    "callrec_sweeper_destroyed", "Recordings destroyed (key, blob and row)", ["reason"]
)
HELD = Gauge("callrec_sweeper_held_expired", "Recordings past retention kept by a legal hold")
OLDEST = Gauge(
    "callrec_sweeper_oldest_remaining_age_seconds",
    "Age since the call ended of the oldest recording not on hold",
)
FAILURES = Counter("callrec_sweeper_failures", "Destructions or runs that failed (retried)")
ORPHANS = Counter("callrec_sweeper_orphans_removed", "Abandoned uploads removed", ["kind"])
LAST_RUN = Gauge("callrec_sweeper_last_run_timestamp_seconds", "When the last sweep ended")

Clock = Callable[[], dt.datetime]
TIMER_HELP = 'run by callrec-sweep.timer: sweep only when [store] sweep_by = "timer"'


class RecordingHeld(Exception):
    def __init__(self, recording_id: str) -> None:
        super().__init__(f"recording {recording_id} is on legal hold; not destroyed")
        self.recording_id = recording_id


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class SweepReport:
    destroyed: int = 0
    held: int = 0
    failed: int = 0
    orphan_keys: int = 0
    partial_blobs: int = 0
    partial_uploads: int = 0
    oldest_age_s: float | None = None


@dataclass(frozen=True)
class _Claimed:
    recording_id: str
    blob_key: str
    ended_at_ms: int = 0


def ended_within(low: int | None, high: int) -> sa.ColumnElement[bool]:
    """The call ended in ``[low, high]`` (ms; a low of None is unbounded)."""
    ended = recordings.c.ended_at_ms
    return ended <= high if low is None else sa.and_(ended >= low, ended <= high)


def expired_clause(now_ms: int, months: int) -> sa.ColumnElement[bool]:
    """The call ended more than the retention ago (``retention.expired_ranges``)."""
    parts = [ended_within(low, high) for low, high in expired_ranges(now_ms, months)]
    return sa.or_(*parts) if parts else sa.false()


class Sweeper:
    def __init__(
        self,
        catalog: Catalog,
        vault: Vault,
        retention_months: int,
        batch: int = 200,
        orphan_grace_s: float = 24 * 3600.0,
        incoming_dir: Path | None = None,
        clock: Clock = utc_now,
        actor: str | None = None,
        part_max_age_s: float | None = None,
        state_dir: Path | None = None,
        partials: Partials | None = None,
    ) -> None:
        # The audit log says which sweeper (host, process) destroyed what.
        self.actor = actor or f"system:sweeper@{socket.gethostname()}/{os.getpid()}"
        self.catalog = catalog
        self.vault = vault
        self.retention_months = retention_months
        self.batch = batch
        self.orphan_grace_s = orphan_grace_s
        self.incoming_dir = incoming_dir
        self.partials = partials  # shared partial uploads (every replica sweeps them)
        self.part_max_age_s = orphan_grace_s if part_max_age_s is None else part_max_age_s
        self.clock = clock
        self.state_dir = state_dir  # where sweep-state.json goes (None: nowhere)
        self.stop_event = threading.Event()

    @classmethod
    def from_config(cls, config: StoreConfig, catalog: Catalog, vault: Vault) -> Sweeper:
        return cls(
            catalog,
            vault,
            config.retention_months,
            config.sweep_batch,
            config.orphan_grace_s,
            config.incoming_dir,
            part_max_age_s=config.part_max_age_s,
            state_dir=config.data_dir,
            partials=open_partials(config, vault),
        )

    def run_once(self) -> SweepReport:
        now_ms = datetime_to_ms(self.clock())
        report = SweepReport()
        self._finish_pending(now_ms, report)
        for low, high in expired_ranges(now_ms, self.retention_months):
            floor = low
            while not self.stop_event.is_set():
                claimed = self._claim(now_ms, floor, high)
                if not claimed:
                    break
                self._destroy(claimed, now_ms, report)
                floor = max(c.ended_at_ms for c in claimed)
        if not self.stop_event.is_set():
            self._remove_orphans(now_ms, report)
        self._measure(now_ms, report)
        log.info(
            "sweep_done",
            destroyed=report.destroyed,
            held=report.held,
            failed=report.failed,
            orphan_keys=report.orphan_keys,
            partial_blobs=report.partial_blobs,
            partial_uploads=report.partial_uploads,
            oldest_age_s="none" if report.oldest_age_s is None else round(report.oldest_age_s),
        )
        LAST_RUN.set(time.time())
        self._publish_head()
        if report.failed == 0 and not self.stop_event.is_set() and self.state_dir is not None:
            write_sweep_state(self.state_dir, report.destroyed, report.held)
        return report

    def _publish_head(self) -> None:
        """The audit chain's head after each sweep, in the log: a copy outside the
        catalog that pins the whole history (``callrec audit verify`` prints the
        same hash)."""
        try:
            head = audit.read_head(self.catalog)
        except Exception:
            log.exception("audit_head_unreadable")
            return
        if head is not None:
            log.info("audit_head", seq=head[0], hash=head[1])

    def destroy(self, recording_id: str, reason: str = "erasure", actor: str = "") -> bool:
        """Destroy one recording now (a data-subject erasure); False when it is not
        there. Refuses a recording on legal hold."""
        now_ms = datetime_to_ms(self.clock())
        with self.catalog.engine.begin() as conn:
            row = conn.execute(
                sa.select(recordings.c.legal_hold, recordings.c.blob_key).where(
                    recordings.c.recording_id == recording_id
                )
            ).first()
            if row is None:
                return False
            if row.legal_hold:
                raise RecordingHeld(recording_id)
            conn.execute(
                sa.update(recordings)
                .where(recordings.c.recording_id == recording_id)
                .where(recordings.c.destroy_reason.is_(None))
                .values(destroy_reason=reason, destroy_marked_at_ms=now_ms)
            )
            _shred(conn, [row.blob_key], now_ms)
        report = SweepReport()
        self._destroy([_Claimed(recording_id, row.blob_key)], now_ms, report, actor or self.actor)
        return report.destroyed == 1

    # ------------------------------------------------------------ the four steps

    def _claim(self, now_ms: int, floor: int | None, high: int) -> list[_Claimed]:
        """Mark the oldest batch of unheld recordings that ended in ``[floor, high]``
        (one of ``expired_ranges``) and shred their keys. ``floor`` is where the
        previous batch of this run ended: one index range scan per batch, however
        many rows earlier batches left behind (PostgreSQL's dead index entries). A row
        below ``floor`` that another sweeper had locked is that sweeper's to destroy,
        or, if its claim rolled back, the next run's."""
        ended = recordings.c.ended_at_ms
        window = ended_within(floor, high)
        pick = self.catalog.skip_locked(
            sa.select(recordings.c.recording_id)
            .where(recordings.c.destroy_reason.is_(None))
            .where(recordings.c.legal_hold.is_(sa.false()))
            .where(window)
            .order_by(ended)
            .limit(self.batch)
        )
        mark = (
            sa.update(recordings)
            .where(recordings.c.recording_id.in_(pick))
            .where(recordings.c.destroy_reason.is_(None))
            .values(destroy_reason="retention", destroy_marked_at_ms=now_ms)
            .returning(recordings.c.recording_id, recordings.c.blob_key, ended)
        )
        with self.catalog.engine.begin() as conn:
            claimed = [
                _Claimed(r.recording_id, r.blob_key, r.ended_at_ms) for r in conn.execute(mark)
            ]
            _shred(conn, [c.blob_key for c in claimed], now_ms)
        return claimed

    def _finish_pending(self, now_ms: int, report: SweepReport) -> None:
        """Marked rows left by a killed or failed run (or by another sweeper)."""
        after = ""
        while not self.stop_event.is_set():
            query = (
                sa.select(recordings.c.recording_id, recordings.c.blob_key)
                .where(recordings.c.destroy_reason.is_not(None))
                .where(recordings.c.recording_id > after)
                .order_by(recordings.c.recording_id)
                .limit(self.batch)
            )
            with self.catalog.engine.begin() as conn:
                pending = [_Claimed(r.recording_id, r.blob_key) for r in conn.execute(query)]
                _shred(conn, [p.blob_key for p in pending], now_ms)
            if not pending:
                return
            log.info("sweep_resumed", count=len(pending))
            self._destroy(pending, now_ms, report)
            after = pending[-1].recording_id

    def _destroy(
        self, claimed: Sequence[_Claimed], now_ms: int, report: SweepReport, actor: str = ""
    ) -> None:
        try:
            failed = self.vault.blobs.delete_many([item.blob_key for item in claimed])
        except Exception:  # e.g. S3 unreachable: the batch is retried next run
            log.exception("sweep_blobs_failed", count=len(claimed))
            failed = {item.blob_key: "blob store error (logged above)" for item in claimed}
        gone: list[_Claimed] = []
        for item in claimed:
            if item.blob_key not in failed:
                gone.append(item)
                continue
            # One bad blob never stops the sweep; its row stays marked for the next run.
            log.error(
                "sweep_failed",
                recording_id=item.recording_id,
                step="blob",
                error=failed[item.blob_key],
            )
            report.failed += 1
            FAILURES.inc()
        if gone:
            self._finish(gone, now_ms, report, actor or self.actor)

    def _finish(
        self, gone: Sequence[_Claimed], now_ms: int, report: SweepReport, actor: str
    ) -> None:
        delete = (
            sa.delete(recordings)
            .where(recordings.c.recording_id.in_([g.recording_id for g in gone]))
            .where(recordings.c.destroy_reason.is_not(None))
            .returning(
                recordings.c.recording_id,
                recordings.c.blob_key,
                recordings.c.ended_at_ms,
                recordings.c.destroy_reason,
            )
        )
        with self.catalog.engine.begin() as conn:
            deleted = list(conn.execute(delete))
            if deleted:
                keys = [r.blob_key for r in deleted]
                conn.execute(sa.delete(data_keys).where(data_keys.c.blob_key.in_(keys)))
            # One event per row deleted, chained in one statement batch (audit.py).
            events = [
                audit.Event(actor, "destroy", row.recording_id, row.destroy_reason, "destroyed")
                for row in deleted
            ]
            # The entries' time is taken under the chain's head lock (audit.py), not
            # at the start of this run: times never go backwards along the chain.
            audit.append_events(conn, events)
        for row in deleted:
            log.info(
                "recording_swept",
                recording_id=row.recording_id,
                reason=row.destroy_reason,
                ended_at=_iso(row.ended_at_ms),
            )
            DESTROYED.labels(reason=row.destroy_reason).inc()
        report.destroyed += len(deleted)

    # ------------------------------------------------------------ orphans, metrics

    def _remove_orphans(self, now_ms: int, report: SweepReport) -> None:
        cutoff = now_ms - int(self.orphan_grace_s * 1000)
        has_row = sa.exists().where(recordings.c.blob_key == data_keys.c.blob_key)
        query = (
            sa.select(data_keys.c.recording_id, data_keys.c.blob_key)
            .where(~has_row)
            .where(sa.or_(data_keys.c.created_at_ms < cutoff, data_keys.c.wrapped_key.is_(None)))
            .limit(self.batch)
        )
        with self.catalog.engine.connect() as conn:
            orphans = list(conn.execute(query))
        for orphan in orphans:
            try:
                if not self.vault.discard_orphan(orphan.recording_id, orphan.blob_key):
                    continue  # its commit wrote the row after all
            except Exception:  # retried next run
                log.exception("orphan_failed", recording_id=orphan.recording_id)
                report.failed += 1
                continue
            report.orphan_keys += 1
            ORPHANS.labels(kind="key_and_blob").inc()
        report.partial_blobs = self.vault.blobs.remove_partial(self.orphan_grace_s)
        ORPHANS.labels(kind="blob_partial").inc(report.partial_blobs)
        if self.incoming_dir is not None:
            report.partial_uploads = remove_stale_uploads(
                self.incoming_dir, self.orphan_grace_s, self.part_max_age_s
            )
            ORPHANS.labels(kind="incoming").inc(report.partial_uploads)
        if self.partials is not None and self.partials.shared:
            shared = self.partials.remove_stale(self.orphan_grace_s, self.part_max_age_s)
            ORPHANS.labels(kind="shared_partial").inc(shared)
            report.partial_uploads += shared

    def _measure(self, now_ms: int, report: SweepReport) -> None:
        live = recordings.c.destroy_reason.is_(None)
        expired = expired_clause(now_ms, self.retention_months)
        held = sa.select(sa.func.count()).where(
            live, recordings.c.legal_hold.is_(sa.true()), expired
        )
        oldest = sa.select(sa.func.min(recordings.c.ended_at_ms)).where(
            live, recordings.c.legal_hold.is_(sa.false())
        )
        with self.catalog.engine.connect() as conn:
            report.held = int(conn.execute(held).scalar_one())
            first = conn.execute(oldest).scalar_one()
        report.oldest_age_s = None if first is None else max(0.0, (now_ms - first) / 1000)
        HELD.set(report.held)
        OLDEST.set(report.oldest_age_s or 0.0)


def _shred(conn: sa.Connection, blob_keys: Sequence[str], now_ms: int) -> None:
    if blob_keys:
        conn.execute(
            sa.update(data_keys)
            .where(data_keys.c.blob_key.in_(list(blob_keys)))
            .where(data_keys.c.wrapped_key.is_not(None))
            .values(wrapped_key=None, shredded_at_ms=now_ms)
        )


def _iso(ms: int) -> str:
    return ms_to_datetime(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


SWEEP_STATE_FILE = "sweep-state.json"


def write_sweep_state(data_dir: Path, destroyed: int, held: int) -> None:
    """A sweep ended without a failure: say when (written, then renamed into place)."""
    state = {"finished_at": time.time(), "destroyed": destroyed, "held": held}
    path = data_dir / SWEEP_STATE_FILE
    tmp = path.with_name(f".{SWEEP_STATE_FILE}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(state) + "\n")
        tmp.replace(path)
    except OSError as exc:  # the sweep itself succeeded; only its monitoring is blind
        log.error("sweep_state_not_written", path=str(path), error=str(exc))


def read_sweep_state(data_dir: Path) -> float | None:
    """When the last successful sweep ended (Unix time), or None (never, or unreadable)."""
    try:
        state = json.loads((data_dir / SWEEP_STATE_FILE).read_text())
        return float(state["finished_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class SweeperLoop:
    """Runs the sweeper every ``interval_s`` on its own thread (STYLE #4)."""

    def __init__(self, sweeper: Sweeper, interval_s: float) -> None:
        self.sweeper = sweeper
        self.interval_s = interval_s
        self.stop_event = sweeper.stop_event
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sweeper.run_once()
            except Exception:  # a failed run is retried at the next interval
                log.exception("sweep_run_failed")
                FAILURES.inc()
            self.stop_event.wait(self.interval_s)


def run_sweeper(config: StoreConfig, once: bool = True, timer: bool = False) -> int:
    """``callrec sweep [--once] [--timer]``: 0 when every destruction succeeded, 1
    otherwise. ``timer``: started by callrec-sweep.timer, which sweeps only for a store
    configured with ``sweep_by = "timer"`` (else the store's own loop is in charge)."""
    if timer and config.sweep_by != "timer":
        log.info("sweep_skipped", reason="the store's own loop sweeps", sweep_by=config.sweep_by)
        return 0
    storage = open_storage(config)
    sweeper = Sweeper.from_config(config, storage.catalog, storage.vault)
    try:
        if once:
            return 0 if sweeper.run_once().failed == 0 else 1
        loop = SweeperLoop(sweeper, config.sweep_interval_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: loop.stop())
        loop.start()
        while loop.is_alive():
            loop.join(1.0)
        return 0
    finally:
        storage.catalog.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callrec sweep", description="destroy expired recordings")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--once", action="store_true", help="one sweep, then exit")
    parser.add_argument("--timer", action="store_true", help=TIMER_HELP)
    args = parser.parse_args(argv)
    try:
        config = load_store_config(args.config)
        logs.configure(config.log_level)
        return run_sweeper(config, once=args.once, timer=args.timer)
    except (ConfigError, KeyFileError) as exc:
        sys.stderr.write(f"callrec sweep: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
