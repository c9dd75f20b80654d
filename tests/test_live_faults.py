"""Faults on the live path with every real peer: SIPp (the PBX), the agent's own
Kamailio front and pjsua2 workers, the store, ``[uplink] live = true``.

The agent's main process SIGKILLed mid-call (its workers go on recording: they drain
their calls) and started again: the restarted agent streams what the old worker goes on
writing from the store's durable sizes, and there is exactly one recording, whose
audio is the whole call, without a byte twice (the store checked each leg's sha256
against the agent's file before the agent let go of it). The store's ``live_timeout``
is shorter than the restart, so the store has already finished the call as
``incomplete`` when the agent comes back: the agent's tail is appended to it and the
archive built again, not quarantined, not stored twice.

A discard through the recording control mid-call reaches the store at once."""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.recorder.sip import call_ref
from agent.store.audit import chain as audit
from agent.store.catalog import live_recordings
from agent.store.ingest import discards
from agent.testcall.sipp import siprec_scenario
from tests.support.audio import decode
from tests.support.daemons import Daemon
from tests.support.pool import Pool, flags, running_pool
from tests.test_control import Api, running_control

pytestmark = [pytest.mark.slow, pytest.mark.sip]

CALL_MS = 12_000
LIVE = {"live": True, "live_flush": "1s", "rescan": "2s"}


def _restart(pool: Pool) -> Daemon:
    old = pool.agent
    again = Daemon("agent", old.args, old.log, old.env)
    seen = len(old.text())
    again.start().wait_for(r"event=agent_ready", timeout=60, after=seen)
    return again


def _store_log(pool: Pool) -> str:
    return (pool.store_dir.parent / "logs" / "store.log").read_text()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(what)


@pytest.mark.alone  # a restart that races the call's end, timed like test_agent_killed
def test_agent_main_process_sigkilled_mid_call_one_whole_recording(tmp_path: Path) -> None:
    with running_pool(
        tmp_path, workers=1, rtp_timeout="30s", uplink=LIVE, store_section={"live_timeout": "3s"}
    ) as pool:
        pool.wait_idle()
        assert pool.agent.process is not None
        with ThreadPoolExecutor(1) as executor:
            placed = executor.submit(pool.place, pool.call(call_ms=CALL_MS), "killed", 60.0)
            _wait(lambda: "event=live_started" in _store_log(pool), 20, "no live_started")
            time.sleep(2.0)  # some audio at the store before the kill
            pool.agent.process.send_signal(signal.SIGKILL)
            pool.agent.process.wait(10)
            # The store hears nothing for live_timeout: it finishes the call incomplete.
            _wait(lambda: "event=live_timed_out" in _store_log(pool), 20, "no live_timed_out")
            pool.agent = _restart(pool)
            result = placed.result()
        assert result.ok, result.errors[-1500:]
        assert result.answered_at is not None and result.bye_at is not None
        rid = re.findall(r"event=live_started recording_id=(\w+)", _store_log(pool))[0]
        _wait(
            lambda: (
                f"event=live_reopened recording_id={rid}" in _store_log(pool)
                and f"event=live_tail_appended recording_id={rid}" in _store_log(pool)
            ),
            60,
            f"not archived again:\n{pool.tail()}\n{_store_log(pool)[-3000:]}",
        )
        row = pool.stored(result.call_id)
        assert row.recording_id == rid
        assert flags(row) == set(), row.flags  # the tail completed it: not incomplete
        audio = decode(pool.export(row, tmp_path / "call.ogg"))
        seconds = len(audio[1]) / audio[0] / 8000
        assert abs(seconds - (result.bye_at - result.answered_at)) <= 0.7, seconds
        assert abs(row.duration_ms / 1000 - seconds) <= 0.7, (row.duration_ms, seconds)
        assert [r.call_ref for r in pool.catalog.list(limit=100)] == [call_ref(result.call_id)]
        assert "event=live_finish_refused" not in pool.text()
        assert not list((pool.root / "agent-data" / "quarantine").glob("*"))


def test_a_discard_mid_call_reaches_the_store_at_once(tmp_path: Path) -> None:
    """The recording control's discard (issue 21) with live on: while the call is still
    up, the store destroys what it streamed (segments and their blobs, the call's data
    key with its row) and keeps the one catalogue entry without audio, audited; the
    hang-up's own Discard finds it done."""
    with running_control(tmp_path, uplink=LIVE) as (running, token):
        api = Api(running, token)
        store_log = running.store_dir.parent / "logs" / "store.log"
        with ThreadPoolExecutor(1) as executor:
            future = executor.submit(
                running.run, siprec_scenario(running.call(call_ms=14_000)), "discard",
                timeout_s=60,
            )  # fmt: skip
            call = api.live("1001")
            rid = call["recording_id"]
            _wait(lambda: f"event=live_started recording_id={rid}" in store_log.read_text(), 20, "")
            time.sleep(1.5)  # a few appends: segments at the store
            assert list(running.store_dir.rglob(f"live-{rid}-*"))
            assert api.request("POST", "/calls/discard", {"extension": "1001"})[0] == 200
            asked = time.monotonic()
            catalog = running.catalog
            _wait(lambda: discards.get(catalog, rid) is not None, 10, "no discard at the store")
            # the segments' blobs go just after the discard's row is committed
            blobs = lambda: list(running.store_dir.rglob(f"live-{rid}-*"))  # noqa: E731
            _wait(lambda: not blobs(), 10, f"segments' blobs left: {blobs()}")
            assert time.monotonic() - asked < 5.0
            assert not future.done(), "the call should still be up"
            with catalog.engine.connect() as conn:
                assert (
                    conn.execute(
                        live_recordings.select().where(live_recordings.c.recording_id == rid)
                    ).first()
                    is None
                )  # the call's data key went with its row
            result = future.result()
        assert result.ok, result.errors[-1500:]
        running.agent.wait_for(rf"event=recording_uploaded recording_id={rid}", 30)
        assert catalog.get(rid) is None
        with catalog.engine.connect() as conn:
            events = [(e.action, e.outcome) for e in audit.events_for(conn, rid)]
            count = conn.execute(
                sa.select(sa.func.count()).select_from(discards.discarded_recordings)
            ).scalar()
        assert events == [("discard", "discarded")] and count == 1
        assert "event=live_discard_sent" in running.text()
        left = [p for root in (running.root, running.store_dir) for p in root.rglob(f"*{rid}*")]
        assert left == [], left
