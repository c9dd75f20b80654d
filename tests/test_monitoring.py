"""Both /metrics endpoints scraped from a real run (tests/support/monitoring_run.py),
parsed with prometheus_client's own parser: each family once, with the values the run
must have produced."""

# The real run (monitoring_run) is a session fixture: tests/conftest.py; the store
# backends' fixtures are imported from tests.support.services.
# ruff: noqa: F811

from __future__ import annotations

import datetime as dt
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load_store_config
from agent.recorder.status import agent_status
from agent.recorder.uplink.backpressure import OutboxLevel
from agent.store.archive.vault import open_storage
from agent.store.catalog import Catalog, recordings
from agent.store.monitoring import measure_catalog
from agent.store.retention.schedule import datetime_to_ms
from agent.store.retention.sweeper import read_sweep_state
from tests.support.daemons import REPO, start_store
from tests.support.monitoring_run import CALLS, Run
from tests.support.services import Backend, backend, make_row, postgres, seaweed  # noqa: F401 (fixtures)
from tests.support.stack import write_toml


@pytest.fixture
def run(monitoring_run: Run) -> Run:
    return monitoring_run


def families(text: str) -> dict[str, Metric]:
    parsed = list(text_string_to_metric_families(text))
    twice = [name for name, n in Counter(f.name for f in parsed).items() if n > 1]
    assert not twice, f"families exposed more than once: {twice}"
    return {f.name: f for f in parsed}


def value(found: dict[str, Metric], sample: str, **labels: str) -> float:
    for family in found.values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample}{labels or ''}")


@pytest.mark.sip
def test_agent_exposes_each_family_once_with_the_main_and_worker_values(run: Run) -> None:
    healthy = families(run.scrapes["agent"])
    assert value(healthy, "callrec_calls_answered_total", source="siprec") == CALLS
    assert value(healthy, "callrec_calls_active") == 0
    assert value(healthy, "callrec_workers_up") == value(healthy, "callrec_workers_configured") == 2
    assert value(healthy, "callrec_outbox_entries") == 0
    assert value(healthy, "callrec_uploads_total", outcome="receipt_ok") == CALLS
    assert value(healthy, "callrec_quarantine_entries") == 0
    assert value(healthy, "callrec_data_dir_free_bytes") > 0
    for role in ("client", "ca"):
        not_after = value(healthy, "callrec_tls_certificate_not_after_timestamp_seconds", role=role)
        assert not_after > run.scraped_at["agent"] + 300 * 86400
    assert "process_resident_memory_bytes" in healthy  # the main process's own
    # No INVITE was refused: the family is declared all the same (dashboards find it).
    assert healthy["callrec_calls_refused"].samples == []
    # The store is down and one recording waits: the main process's gauges, once.
    down = families(run.scrapes["agent_store_down"])
    assert value(down, "callrec_outbox_entries") == 1
    assert value(down, "callrec_outbox_bytes") > 1000
    assert value(down, "callrec_calls_answered_total", source="siprec") == CALLS + 1


@pytest.mark.sip
def test_store_exposes_retention_ingest_access_audit_and_keys(run: Run) -> None:
    store = families(run.scrapes["store"])
    assert value(store, "callrec_sweeper_destroyed_total", reason="retention") == 1
    assert value(store, "callrec_sweeper_held_expired") == 1
    assert value(store, "callrec_store_held_past_retention") == 1
    assert value(store, "callrec_store_recordings_past_retention") == 0
    assert value(store, "callrec_store_past_retention_max_seconds") == 0
    # The oldest unheld recording is one of the calls just made.
    assert 0 <= value(store, "callrec_store_oldest_recording_age_seconds") < 120
    assert value(store, "callrec_store_retention_seconds") == pytest.approx(6 * 30.44 * 86400)
    assert value(store, "callrec_sweeper_interval_seconds") == 3600
    last_sweep = value(store, "callrec_sweeper_last_success_timestamp_seconds")
    assert last_sweep == pytest.approx(value(store, "callrec_sweeper_last_run_timestamp_seconds"))
    assert value(store, "callrec_ingest_uploads_stored_total") == CALLS
    assert value(store, "callrec_ingest_bytes_stored_total") > CALLS * 1000
    assert value(store, "callrec_ingest_uploads_in_progress") == 0
    assert value(store, "callrec_ingest_refused_total", code="INVALID_ARGUMENT") == 1
    assert (
        value(store, "callrec_access_requests_total", operation="search", outcome="unauthenticated")
        == 1
    )
    # One destruction and one refusal were audited, besides the uploads' own events.
    assert value(store, "callrec_store_audit_head_seq") >= 2
    # Data keys: the two calls and the held recording, all under the one master key.
    (master,) = [s for s in store["callrec_store_master_keys"].samples]
    assert master.labels["current"] == "1"
    assert value(store, "callrec_store_data_keys", key_id=master.labels["key_id"]) == CALLS + 1
    assert value(store, "callrec_data_dir_free_bytes") > 0
    # Mutual TLS: the store's certificate and CA, as issued (days of validity left).
    days = (
        value(store, "callrec_tls_certificate_not_after_timestamp_seconds", role="server")
        - run.scraped_at["store"]
    ) / 86400
    assert days > 300
    # Each daemon shows its own families only (both import the shared metrics module).
    agent = families(run.scrapes["agent"])
    assert not {n for n in store if n.startswith(("callrec_outbox", "callrec_calls"))}
    assert not {n for n in agent if n.startswith(("callrec_sweeper", "callrec_store"))}


@pytest.mark.sip
def test_seeded_recordings_are_what_the_store_counted(run: Run) -> None:
    """The figures above are the catalog's: the expired one went, the held one stayed."""
    ids = _catalog_ids(run.root)
    assert run.seeded["expired"] not in ids
    assert run.seeded["held"] in ids
    assert len(ids) == CALLS + 1


@pytest.mark.sip
def test_agent_status_line_says_workers_calls_and_outbox(run: Run) -> None:
    """What `systemctl status callrec-agent` shows, sent over a real notify socket."""
    assert "STATUS=workers 2/2 up, 0 calls, outbox 0 (0 B)" in run.status, run.status
    waiting = [s for s in run.status if "outbox 1 (" in s]
    assert waiting, run.status
    assert re.fullmatch(
        r"STATUS=workers 2/2 up, 0 calls, outbox 1 \(\d+\.\d kB\), oldest \d+s", waiting[-1]
    ), waiting[-1]


@pytest.mark.sip
def test_store_status_line_says_uploads_and_last_sweep(run: Run) -> None:
    """What `systemctl status callrec-store` shows, sent over a real notify socket."""
    line = re.compile(
        rf"STATUS=uploads {CALLS} stored \(\d+\.\d kB\), 0 in progress, 1 refused; "
        r"last sweep \d{4}-\d\d-\d\d \d\d:\d\d UTC by store"
    )
    assert any(line.fullmatch(s) for s in run.store_status), run.store_status[-3:]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            (4, 4, 3, OutboxLevel(2, 1_234_567, 40.2, ())),
            "workers 4/4 up, 3 calls, outbox 2 (1.2 MB), oldest 40s",
        ),
        ((3, 4, 1, OutboxLevel(0, 0, 0.0, ())), "workers 3/4 up, 1 call, outbox 0 (0 B)"),
        (
            (4, 4, 0, OutboxLevel(9, 3 * 10**9, 7200.0, ("bytes", "age")), 2),
            "workers 4/4 up, 0 calls, outbox 9 (3.0 GB), oldest 7200s, OVER bytes+age limit, "
            "quarantine 2",
        ),
    ],
)
def test_agent_status_wording(args: tuple[object, ...], line: str) -> None:
    full = (*args, 0) if len(args) == 4 else args
    assert agent_status(*full) == line  # type: ignore[arg-type]


# ---------------------------------------------------------------- one retention scheduler


def _store_with_expired(root: Path, **store: str) -> tuple[Path, str]:
    doc: dict[str, dict[str, object]] = {
        "store": {"listen": "127.0.0.1:0", "data_dir": str(root / "store-data"), **store},
        "store.tls": {"insecure": True},
    }
    config = write_toml(root / "store.toml", doc)
    storage = open_storage(load_store_config(config))
    try:
        rid = secrets.token_hex(16)
        (root / "a.part").write_bytes(b"x" * 512)
        blob_key = storage.vault.store(rid, root / "a.part", root)
        ended = datetime_to_ms(dt.datetime.now(dt.UTC) - dt.timedelta(days=213))
        assert storage.catalog.insert(make_row(rid, blob_key, ended))
    finally:
        storage.catalog.close()
    return config, rid


def _timer_sweep(config: Path) -> subprocess.CompletedProcess[str]:
    """What callrec-sweep.service runs (its ExecStart, with this config)."""
    unit = (REPO / "systemd" / "callrec-sweep.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    args = exec_start.split()[1:]  # after /opt/callrec/venv/bin/callrec
    args[args.index("--config") + 1] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def _catalog_ids(root: Path) -> set[str]:
    catalog = Catalog(f"sqlite:///{root / 'store-data' / 'catalog.sqlite3'}")
    try:
        with catalog.engine.connect() as conn:
            return set(conn.execute(sa.select(recordings.c.recording_id)).scalars())
    finally:
        catalog.close()


def test_by_default_the_store_sweeps_and_the_timer_run_does_nothing(tmp_path: Path) -> None:
    config, rid = _store_with_expired(tmp_path)
    timer = _timer_sweep(config)
    assert timer.returncode == 0, timer.stderr
    assert "sweep_skipped" in timer.stdout + timer.stderr
    assert rid in _catalog_ids(tmp_path), "the timer swept though the store is in charge"
    store, _ = start_store(tmp_path)
    try:
        store.wait_for(r"event=sweep_done destroyed=1 ")
    finally:
        store.stop()
    assert rid not in _catalog_ids(tmp_path)


def test_with_sweep_by_timer_only_the_timer_sweeps(tmp_path: Path) -> None:
    config, rid = _store_with_expired(tmp_path, sweep_by="timer")
    store, _ = start_store(tmp_path, sweep_by="timer")
    try:
        time.sleep(2.0)
    finally:
        store.stop()
    assert "sweep_done" not in store.text()
    assert rid in _catalog_ids(tmp_path)
    timer = _timer_sweep(config)
    assert timer.returncode == 0, timer.stderr
    assert rid not in _catalog_ids(tmp_path)
    assert read_sweep_state(tmp_path / "store-data") is not None


# ---------------------------------------------------------------- the catalog's figures


def test_catalog_figures_on_every_backend(backend: Backend) -> None:
    """measure_catalog's SQL on SQLite and PostgreSQL: an overdue, a held and a fresh
    recording (the figures /metrics shows)."""
    storage = open_storage(backend.config())
    work = backend.root / "work"
    work.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    try:
        for days, held in ((200, False), (250, True), (1, False)):
            rid = secrets.token_hex(16)
            (work / rid).write_bytes(b"x" * 256)
            blob_key = storage.vault.store(rid, work / rid, work)
            ended = datetime_to_ms(now - dt.timedelta(days=days))
            assert storage.catalog.insert(make_row(rid, blob_key, ended, legal_hold=held))
        figures = measure_catalog(storage.catalog, 6)
    finally:
        storage.catalog.close()
    assert figures.past_retention == 1 and figures.held_past_retention == 1
    # 200 days after the call, six calendar months (181 to 184 days) after it: 16 to 19 days.
    assert 16 * 86400 <= figures.most_overdue_s <= 19 * 86400 + 60
    assert abs(figures.oldest_age_s - 200 * 86400) < 60
    assert sum(figures.data_keys.values()) == 3 and len(figures.data_keys) == 1
    assert figures.audit_seq == 0  # nothing audited yet: the genesis head
