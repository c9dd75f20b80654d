"""How the daemons behave under a service manager: sd_notify order, graceful stop."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.catalog import Catalog
from agent.testcall import SiprecCall, free_port, make_speech, run_sipp, siprec_scenario
from tests.support.daemons import NotifySocket, start_agent, start_store
from tests.support.faults import signal_storm
from tests.support.services import free_tcp_port
from tests.support.stack import Keys


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _env(notify: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}


def _assert_lifecycle(sent: list[str]) -> None:
    states = [s for s in sent if not s.startswith("STATUS=")]
    assert states, "nothing was sent to NOTIFY_SOCKET"
    assert states[0] == "READY=1", states
    assert states[-1] == "STOPPING=1", states
    assert states.count("READY=1") == 1 and states.count("STOPPING=1") == 1
    assert states.count("WATCHDOG=1") >= 2, states
    assert set(states) <= {"READY=1", "WATCHDOG=1", "STOPPING=1"}, states


def test_store_notifies_ready_watchdog_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    store, _ = start_store(tmp_path, env=_env(notify))
    try:
        time.sleep(2.5)
    finally:
        assert store.stop() == 0
    _assert_lifecycle(notify.states())
    status = [s for s in notify.states() if s.startswith("STATUS=")]
    assert status, "no STATUS= line for systemctl status"
    assert re.fullmatch(
        r"STATUS=uploads 0 stored \(0 B\), 0 in progress, 0 refused; "
        r"last sweep \d{4}-\d\d-\d\d \d\d:\d\d UTC by store",
        status[-1],
    ), status[-1]


@pytest.mark.sip
def test_agent_notifies_only_after_workers_and_store_link_are_up(
    tmp_path: Path, keys: Keys, notify: NotifySocket
) -> None:
    store, address = start_store(tmp_path)
    agent = None
    try:
        agent = start_agent(tmp_path, keys, address, free_port(), env=_env(notify))
        ready_at = notify.messages[0][0]
        # READY came only after the worker's SIP transport was up.
        assert "event=sip_started worker=0" in agent.text().split("event=agent_ready")[0]
        time.sleep(2.5)
        assert agent.stop() == 0
    finally:
        if agent is not None:
            agent.stop()
        store.stop()
    _assert_lifecycle(notify.states())
    assert ready_at <= notify.messages[1][0]
    assert "STATUS=workers 1/1 up, 0 calls, outbox 0 (0 B)" in notify.states()


@pytest.mark.sip
@pytest.mark.slow
def test_sigterm_during_three_calls_records_them_all(tmp_path: Path, keys: Keys) -> None:
    speech = make_speech(tmp_path / "speech")
    store, address = start_store(tmp_path)
    sip_port = free_port()
    agent = None
    try:
        agent = start_agent(tmp_path, keys, address, sip_port)
        results: dict[int, object] = {}

        def call(n: int, call_ms: int) -> None:
            spec = SiprecCall(
                speech.customer,
                speech.employee,
                call_ms=call_ms,
                service="sip:01005577@pbx.example",
            )
            results[n] = run_sipp(
                siprec_scenario(spec), ("127.0.0.1", sip_port), tmp_path / f"pbx{n}", timeout_s=30
            )

        calls = [threading.Thread(target=call, args=(n, 7000)) for n in range(3)]
        for t in calls:
            t.start()
        agent.wait_for(r"(event=call_answered.*\n.*){3}", timeout=10)
        assert agent.process is not None
        agent.process.terminate()
        agent.wait_for(r"event=agent_stopping", timeout=5)
        late = SiprecCall(speech.customer, speech.employee, call_ms=1000)
        refused = run_sipp(
            siprec_scenario(late), ("127.0.0.1", sip_port), tmp_path / "late", timeout_s=10
        )
        assert not refused.ok, "a call after SIGTERM must not be recorded"
        for t in calls:
            t.join(40)
        assert agent.process.wait(60) == 0
        rows = Catalog(f"sqlite:///{tmp_path / 'store-data' / 'catalog.sqlite3'}").list()
    finally:
        if agent is not None:
            agent.stop()
        store.stop()
    assert all(r.ok for r in results.values()), results  # type: ignore[attr-defined]
    assert len(rows) == 3
    for row in rows:
        assert "incomplete" not in row.flags
        assert abs(row.duration_ms - 7000) < 800
    assert "event=agent_stopped outbox_left=0" in agent.text()


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.mark.sip
def test_metrics_count_exactly_the_calls_made(tmp_path: Path, keys: Keys) -> None:
    speech = make_speech(tmp_path / "speech")
    store, address = start_store(tmp_path)
    sip_port, metrics_port = free_port(), free_tcp_port()
    agent = None
    try:
        agent = start_agent(
            tmp_path, keys, address, sip_port, agent={"metrics": f"127.0.0.1:{metrics_port}"}
        )
        before = _scrape(metrics_port)
        calls = 3
        for n in range(calls):
            spec = SiprecCall(
                speech.customer, speech.employee, call_ms=1500, service="sip:01005577@pbx.example"
            )
            assert run_sipp(siprec_scenario(spec), ("127.0.0.1", sip_port), tmp_path / f"pbx{n}").ok
        deadline = time.monotonic() + 30
        while agent.text().count("event=recording_uploaded") < calls:
            assert time.monotonic() < deadline, agent.text()[-3000:]
            time.sleep(0.2)
        after = _scrape(metrics_port)
    finally:
        if agent is not None:
            agent.stop()
        store.stop()

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved('callrec_calls_answered_total{source="siprec"}') == calls
    assert moved('callrec_calls_ended_total{reason="bye"}') == calls
    assert moved('callrec_recordings_finalized_total{source="siprec"}') == calls
    assert after["callrec_calls_active"] == 0
    # counted once a second while a call is up: most of each 1.5 s call
    assert moved('callrec_rtp_packets_received_total{party="customer"}') > calls * 20
    assert after.get("callrec_outbox_entries", 0) == 0


@pytest.mark.sip
@pytest.mark.slow
def test_a_storm_of_sighups_leaves_the_agent_reloading_and_stopping_cleanly(
    tmp_path: Path, keys: Keys
) -> None:
    """SIGHUPs (log rotation, reloads) faster than the agent handles them: it reloads,
    passes them on to its worker, and still stops at once and cleanly on SIGTERM. A
    handler that took a lock (``threading.Event``) could wait for ever on the lock of
    the code it interrupted (agent.recorder.signals)."""
    agent = start_agent(tmp_path, keys, "127.0.0.1:1", free_port())  # no store needed
    try:
        assert agent.process is not None
        seen = len(agent.text())
        sent = signal_storm(agent.process.pid, (signal.SIGHUP,), seconds=1.5)
        assert sent > 1000
        agent.wait_for(r"event=reloaded log_level=info", timeout=10, after=seen)
        agent.wait_for(r"event=directory_unchanged|event=reloaded worker=0", 10, after=seen)
        started = time.monotonic()
        agent.process.terminate()
        code = agent.process.wait(30)
        took = time.monotonic() - started
    finally:
        agent.stop()
    text = agent.text()
    assert code == 0, text[-3000:]
    assert took < 10, took
    assert "event=agent_stopped" in text and "event=worker_stopped worker=0" in text
    assert "Traceback" not in text and "RecursionError" not in text, text[-3000:]
