"""The retention sweeper: calendar arithmetic, a controllable clock across the six-month
line, half-done destructions, orphans, SIGKILL at random points, and two sweepers at
once on PostgreSQL. Catalog/blob bodies run on SQLite + files and PostgreSQL + S3."""

# Fixtures are imported from tests.support.services; test arguments name them.
# ruff: noqa: F811

from __future__ import annotations

import datetime as dt
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from agent.store.archive.vault import Storage, open_storage
from agent.store.audit.chain import audit_events
from agent.store.catalog import data_keys, recordings
from agent.store.retention.schedule import (
    add_months,
    datetime_to_ms,
    expired_ranges,
    is_expired,
    ms_to_datetime,
)
from agent.store.retention.sweeper import RecordingHeld, Sweeper, SweeperLoop
from tests.support.services import Backend, backend, distributed, make_row, postgres, seaweed  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
UTC = dt.UTC


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


# ---------------------------------------------------------------- calendar arithmetic


@pytest.mark.parametrize(
    ("ended", "months", "expires"),
    [
        ("2025-08-31 10:00", 6, "2026-02-28 10:00"),
        ("2023-08-31 10:00", 6, "2024-02-29 10:00"),  # leap year
        ("2025-08-30 23:59:59.999", 6, "2026-02-28 23:59:59.999"),
        ("2025-08-28 00:00", 6, "2026-02-28 00:00"),
        ("2025-03-31 08:00", 6, "2025-09-30 08:00"),
        ("2025-11-30 12:00", 3, "2026-02-28 12:00"),
        ("2025-12-15 12:00", 2, "2026-02-15 12:00"),  # over the year end
        ("2025-01-31 12:00", 1, "2025-02-28 12:00"),
        ("2024-02-29 12:00", 12, "2025-02-28 12:00"),
        ("2025-07-31 12:00", 6, "2026-01-31 12:00"),
    ],
)
def test_calendar_months_clamp_to_the_month_end(ended: str, months: int, expires: str) -> None:
    assert add_months(at(ended), months) == at(expires)


_MS_2000, _MS_2090 = datetime_to_ms(at("2000-01-01")), datetime_to_ms(at("2090-01-01"))


@settings(max_examples=3000, deadline=None)
@given(
    now=st.integers(_MS_2000, _MS_2090),
    shift=st.integers(-6 * 86_400_000, 6 * 86_400_000),
    months=st.sampled_from([1, 2, 3, 6, 12, 13]),
)
def test_expired_ranges_select_exactly_the_expired(now: int, shift: int, months: int) -> None:
    ended = datetime_to_ms(add_months(ms_to_datetime(now), -months)) + shift
    inside = any(
        (low is None or low <= ended) and ended <= high for low, high in expired_ranges(now, months)
    )
    assert inside == is_expired(ended, now, months)


# ---------------------------------------------------------------- helpers


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass(frozen=True)
class Seeded:
    recording_id: str
    blob_key: str


def seed(storage: Storage, work: Path, ended: dt.datetime, held: bool = False) -> Seeded:
    rid = secrets.token_hex(16)
    source = work / f"{rid}.part"
    source.write_bytes(rid.encode() * 64)
    blob_key = storage.vault.store(rid, source, work)
    row = make_row(rid, blob_key, datetime_to_ms(ended), legal_hold=held)
    assert storage.catalog.insert(row)
    source.unlink()
    return Seeded(rid, blob_key)


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:
    opened = open_storage(backend.config())
    yield opened
    opened.catalog.close()


def remaining(storage: Storage) -> set[str]:
    with storage.catalog.engine.connect() as conn:
        return set(conn.execute(sa.select(recordings.c.recording_id)).scalars())


def audit_reasons(storage: Storage) -> dict[str, list[str]]:
    query = sa.select(audit_events.c.recording_id, audit_events.c.reason).where(
        audit_events.c.action == "destroy"
    )
    found: dict[str, list[str]] = {}
    with storage.catalog.engine.connect() as conn:
        for rid, reason in conn.execute(query):
            found.setdefault(rid, []).append(reason)
    return found


def assert_consistent(storage: Storage) -> None:
    """No row without blob, no blob without row, keys gone with their rows."""
    with storage.catalog.engine.connect() as conn:
        rows = {
            k: v
            for k, v in conn.execute(sa.select(recordings.c.blob_key, recordings.c.destroy_reason))
        }
        keys = {
            k: v for k, v in conn.execute(sa.select(data_keys.c.blob_key, data_keys.c.wrapped_key))
        }
    assert all(reason is None for reason in rows.values()), "no half-done destruction left"
    assert set(storage.blobs.keys()) == set(rows) == set(keys)
    assert all(wrapped is not None for wrapped in keys.values())


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- the six-month line


def test_exactly_the_expired_unheld_recordings_go(storage: Storage, tmp_path: Path) -> None:
    s = {
        "leap": seed(storage, tmp_path, at("2023-08-31 12:00")),  # → 2024-02-29 12:00
        "old": seed(storage, tmp_path, at("2024-01-01 00:00")),  # → 2024-07-01
        "aug29": seed(storage, tmp_path, at("2025-08-29 09:00")),  # → 2026-02-28 09:00
        "aug31": seed(storage, tmp_path, at("2025-08-31 10:00")),  # → 2026-02-28 10:00
        "aug28": seed(storage, tmp_path, at("2025-08-28 12:00")),  # → 2026-02-28 12:00
        "sep1": seed(storage, tmp_path, at("2025-09-01 00:00")),  # → 2026-03-01 00:00
        "held": seed(storage, tmp_path, at("2025-08-31 10:00"), held=True),
        "fresh": seed(storage, tmp_path, at("2026-01-15 08:00")),
    }
    clock = Clock(at("2024-02-29 11:59:59.999"))
    sweeper = Sweeper(storage.catalog, storage.vault, retention_months=6, batch=2, clock=clock)
    destroyed_before = metric("callrec_sweeper_destroyed_total", reason="retention")
    steps = [
        ("2024-02-29 11:59:59.999", []),
        ("2024-02-29 12:00", ["leap"]),
        ("2026-02-28 08:59:59.999", ["old"]),
        ("2026-02-28 09:00", ["aug29"]),
        ("2026-02-28 10:00", ["aug31"]),  # aug28 ended earlier but expires later
        ("2026-02-28 11:59:59.999", []),
        ("2026-02-28 12:00", ["aug28"]),
        ("2026-03-01 00:00", ["sep1"]),
    ]
    gone: list[str] = []
    for now, expected in steps:
        clock.now = at(now)
        report = sweeper.run_once()
        gone += expected
        assert report.destroyed == len(expected), now
        assert remaining(storage) == {s[k].recording_id for k in s if k not in gone}, now
        assert_consistent(storage)
    assert report.held == 1 and metric("callrec_sweeper_held_expired") == 1
    assert report.oldest_age_s == (at("2026-03-01") - at("2026-01-15 08:00")).total_seconds()
    assert metric("callrec_sweeper_destroyed_total", reason="retention") - destroyed_before == 6
    assert audit_reasons(storage) == {s[k].recording_id: ["retention"] for k in gone}


def test_one_run_takes_every_batch_also_across_equal_end_times(
    storage: Storage, tmp_path: Path
) -> None:
    """Each batch starts where the previous one ended (``ended_at_ms >=``): recordings
    that ended at the same instant as the last of a batch are not skipped."""
    same = [seed(storage, tmp_path, at("2025-03-01 10:00")) for _ in range(5)]
    others = [seed(storage, tmp_path, at(f"2025-0{m}-01 09:00")) for m in (2, 3, 4)]
    fresh = seed(storage, tmp_path, at("2026-01-15 08:00"))
    sweeper = Sweeper(storage.catalog, storage.vault, retention_months=6, batch=2,
                      clock=Clock(at("2026-02-01 00:00")))  # fmt: skip
    report = sweeper.run_once()
    assert report.destroyed == len(same) + len(others) and report.failed == 0
    assert remaining(storage) == {fresh.recording_id}
    assert set(audit_reasons(storage)) == {s.recording_id for s in same + others}
    assert_consistent(storage)


def test_erasure_destroys_one_recording_now_but_not_one_on_hold(
    storage: Storage, tmp_path: Path
) -> None:
    kept = seed(storage, tmp_path, at("2026-01-01"), held=True)
    erased = seed(storage, tmp_path, at("2026-01-01"))
    sweeper = Sweeper(storage.catalog, storage.vault, retention_months=6)
    assert sweeper.destroy(erased.recording_id, "erasure", actor="privacy:e3001")
    assert not sweeper.destroy(erased.recording_id)
    with pytest.raises(RecordingHeld, match=kept.recording_id):
        sweeper.destroy(kept.recording_id)
    assert remaining(storage) == {kept.recording_id}
    assert audit_reasons(storage) == {erased.recording_id: ["erasure"]}
    assert_consistent(storage)


@pytest.mark.parametrize("stage", ["marked", "shredded", "blob_deleted"])
def test_a_half_done_destruction_is_finished_by_the_next_run(
    storage: Storage, tmp_path: Path, stage: str
) -> None:
    """What a kill between the steps leaves behind (mark → shred → blob → row)."""
    victim = seed(storage, tmp_path, at("2026-01-01"))
    other = seed(storage, tmp_path, at("2026-01-01"))
    with storage.catalog.engine.begin() as conn:
        conn.execute(
            sa.update(recordings)
            .where(recordings.c.recording_id == victim.recording_id)
            .values(destroy_reason="erasure", destroy_marked_at_ms=1)
        )
    if stage in ("shredded", "blob_deleted"):
        storage.vault.shred(victim.blob_key)
    if stage == "blob_deleted":
        storage.blobs.delete(victim.blob_key)
    clock = Clock(at("2026-02-01"))  # nothing has expired yet
    report = Sweeper(storage.catalog, storage.vault, retention_months=6, clock=clock).run_once()
    assert report.destroyed == 1
    assert remaining(storage) == {other.recording_id}
    assert audit_reasons(storage) == {victim.recording_id: ["erasure"]}
    assert_consistent(storage)


def test_orphans_are_removed_after_the_grace_period(
    storage: Storage, backend: Backend, tmp_path: Path
) -> None:
    kept = seed(storage, tmp_path, dt.datetime.now(UTC) - dt.timedelta(days=1))
    # An upload killed after its key and blob were written, before its row.
    source = tmp_path / "orphan.part"
    source.write_bytes(b"o" * 1000)
    orphan_key = storage.vault.store("f" * 32, source, tmp_path)
    incoming = backend.config().incoming_dir
    incoming.mkdir(parents=True, exist_ok=True)
    stale = [incoming / f"{'a' * 32}.part", incoming / f"{'a' * 32}.manifest"]
    fresh = [incoming / f"{'b' * 32}.part", incoming / f"{'b' * 32}.manifest"]
    for path in stale + fresh:
        path.write_bytes(b"x")
    old = time.time() - 2 * 86400
    for path in stale:
        os.utime(path, (old, old))

    def sweep(now: dt.datetime) -> int:
        sweeper = Sweeper(storage.catalog, storage.vault, 6, 200, 86400.0, incoming, Clock(now))
        report = sweeper.run_once()
        return report.orphan_keys

    assert sweep(dt.datetime.now(UTC)) == 0, "within the grace period"
    assert orphan_key in set(storage.blobs.keys())
    assert sweep(dt.datetime.now(UTC) + dt.timedelta(days=2)) == 1
    assert orphan_key not in set(storage.blobs.keys())
    assert sorted(incoming.iterdir()) == sorted(fresh)
    assert remaining(storage) == {kept.recording_id}
    assert_consistent(storage)


def test_loop_runs_and_stops_promptly(storage: Storage, tmp_path: Path) -> None:
    expired = seed(storage, tmp_path, at("2020-01-01"))
    loop = SweeperLoop(Sweeper(storage.catalog, storage.vault, 6), interval_s=3600)
    loop.start()
    deadline = time.monotonic() + 20
    while expired.recording_id in remaining(storage) and time.monotonic() < deadline:
        time.sleep(0.05)
    loop.stop()
    loop.join(5)
    assert not loop.is_alive()
    assert expired.recording_id not in remaining(storage)


# ---------------------------------------------------------------- processes


def _sweep_cmd(config: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent.store.retention.sweeper",
        "--config",
        str(config),
        "--once",
    ]


def _months_ago(months: int) -> dt.datetime:
    return add_months(dt.datetime.now(UTC), -months) - dt.timedelta(days=2)


@pytest.mark.slow
def test_sweeper_killed_at_random_points_leaves_nothing_behind(
    backend: Backend, tmp_path: Path
) -> None:
    """12 runs (``CALLREC_KILL_RUNS`` for more), each SIGKILLed at a random instant: a
    quarter of them anywhere from start-up on, the rest at a random point after the first
    destruction is logged (start-up is most of a run's time, the destructions a few ms
    each): the test watches the catalog for the first mark, then waits a random time."""
    config = backend.write_toml(tmp_path / "store.toml", sweep_batch=3)
    storage = open_storage(backend.config())
    work = tmp_path / "work"
    work.mkdir()
    survivors = {seed(storage, work, _months_ago(1)).recording_id for _ in range(4)}
    survivors |= {seed(storage, work, _months_ago(7), held=True).recording_id for _ in range(2)}
    expired = {seed(storage, work, _months_ago(7)).recording_id for _ in range(PER_RUN)}
    startup, work_s = _calibrate(config, storage, expired)
    rng = random.Random(int(os.environ.get("CALLREC_KILL_SEED") or secrets.randbits(32)))
    interrupted = 0
    runs = int(os.environ.get("CALLREC_KILL_RUNS") or 12)
    for run in range(runs):
        batch = {seed(storage, work, _months_ago(7)).recording_id for _ in range(PER_RUN)}
        expired |= batch
        if run % 4 == 0:
            _kill_after(config, rng.uniform(0.0, startup + work_s))
        else:
            _kill_after(config, rng.uniform(0.0, work_s), progress=(storage, batch))
        left = remaining(storage) & batch
        interrupted += 0 < len(left) < PER_RUN or (bool(left) and _marked(storage))
    final = subprocess.run(
        _sweep_cmd(config), cwd=REPO, capture_output=True, timeout=120, check=False
    )
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    assert remaining(storage) == survivors
    assert_consistent(storage)
    reasons = audit_reasons(storage)
    assert set(reasons) == expired and all(r == ["retention"] for r in reasons.values())
    # Proof that the kills really cut sweeps short (not all landed before or after one);
    # how many do depends on the machine's load, so the bar is low.
    assert interrupted >= 3, f"only {interrupted} of {runs} kills landed mid-sweep"
    storage.catalog.close()


PER_RUN = 30


def _calibrate(config: Path, storage: Storage, batch: set[str]) -> tuple[float, float]:
    """Seconds to the first destruction, and from there to the last one (not to the end
    of the run: what a sweep does after its destructions, such as logging the audit
    head, would otherwise widen the window past them)."""
    started = time.monotonic()
    proc = subprocess.Popen(_sweep_cmd(config), cwd=REPO, stdout=subprocess.DEVNULL)
    _wait_for_progress(proc, storage, batch)
    first = time.monotonic()
    while proc.poll() is None and remaining(storage) & batch:
        time.sleep(0.002)
    last = time.monotonic()
    assert proc.wait(60) == 0
    return first - started, max(last - first, 0.01)


def _wait_for_progress(proc: subprocess.Popen[bytes], storage: Storage, batch: set[str]) -> None:
    """Until a recording of ``batch`` is marked or gone (or the run ended)."""
    while proc.poll() is None:
        if _marked(storage) or len(remaining(storage) & batch) < len(batch):
            return
        time.sleep(0.002)


def _kill_after(
    config: Path, delay: float, progress: tuple[Storage, set[str]] | None = None
) -> None:
    proc = subprocess.Popen(_sweep_cmd(config), cwd=REPO, stdout=subprocess.DEVNULL)
    if progress is not None:
        _wait_for_progress(proc, *progress)
    time.sleep(delay)
    proc.kill()
    proc.wait(10)


def _marked(storage: Storage) -> bool:
    query = sa.select(sa.func.count()).where(recordings.c.destroy_reason.is_not(None))
    with storage.catalog.engine.connect() as conn:
        return bool(conn.execute(query).scalar())


@pytest.mark.slow
def test_two_sweepers_at_once_destroy_each_recording_exactly_once(
    distributed: Backend, tmp_path: Path
) -> None:
    config = distributed.write_toml(tmp_path / "store.toml", sweep_batch=5)
    storage = open_storage(distributed.config())
    work = tmp_path / "work"
    work.mkdir()
    expired = {seed(storage, work, _months_ago(7)).recording_id for _ in range(300)}
    logs = [(tmp_path / f"sweeper-{i}.log").open("wb") for i in range(2)]
    # A gate: the catalog's recordings table is locked until both sweepers wait on it, so
    # a slow start of one (a busy host) can't let the other finish alone.
    with storage.catalog.engine.connect() as gate:
        gate.execute(sa.text("LOCK TABLE recordings IN ACCESS EXCLUSIVE MODE"))
        procs = [subprocess.Popen(_sweep_cmd(config), cwd=REPO, stdout=f, stderr=f) for f in logs]
        _wait_for_lock_waiters(storage, 2, procs)
        gate.rollback()
    assert [p.wait(120) for p in procs] == [0, 0]
    for f in logs:
        f.close()
    assert remaining(storage) == set()
    reasons = audit_reasons(storage)
    assert set(reasons) == expired and all(len(r) == 1 for r in reasons.values())
    assert_consistent(storage)
    with storage.catalog.engine.connect() as conn:
        actors = dict(
            conn.execute(
                sa.select(audit_events.c.actor, sa.func.count()).group_by(audit_events.c.actor)
            ).all()
        )
    assert len(actors) == 2, f"the two sweepers did not overlap: {actors}"
    storage.catalog.close()


def _wait_for_lock_waiters(
    storage: Storage, count: int, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Wait (up to 60 s) until ``count`` PostgreSQL sessions wait on a lock."""
    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    deadline = time.monotonic() + 60
    with storage.catalog.engine.connect() as conn:
        while conn.execute(query).scalar_one() < count:
            assert all(p.poll() is None for p in procs), "a sweeper exited at the gate"
            assert time.monotonic() < deadline, "the sweepers never reached the catalog"
            conn.rollback()
            time.sleep(0.1)
