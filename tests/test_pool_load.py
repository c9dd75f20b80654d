"""The recorder pool under load and faults (``slow``): 30 two-stream SIPREC calls with
real speech on 8 workers, 40 on their 32 slots (the SRC sees 503 for the rest), a
worker SIGKILLed mid-call, and the agent shut down with a call in progress. What was
stored is checked as in test_pool.py."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.recorder.sip import call_ref
from agent.store.catalog import RecordingRow
from agent.testcall.sipp import SippResult, siprec_scenario
from tests.support.audio import decode
from tests.support.pool import (
    Pool,
    assert_times,
    flags,
    running_pool,
    second_pool,
    window_rms,
)

pytestmark = [pytest.mark.sip, pytest.mark.slow, pytest.mark.alone]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with running_pool(tmp_path_factory.mktemp("pool"), workers=8) as running:
        yield running


@pytest.fixture
def idle(pool: Pool) -> Pool:
    pool.wait_idle()
    return pool


@pytest.fixture
def small_pool(pool: Pool) -> Iterator[Pool]:
    """A second agent with two workers (its own front on its own port)."""
    with second_pool(pool, 2, drain="10s") as running:
        yield running


# ---------------------------------------------------------------- load (slow)


def _load(pool: Pool, calls: int, name: str) -> tuple[SippResult, dict[str, RecordingRow]]:
    """``calls`` SIPREC calls of 9 s from ONE SIPp at 20 calls/s with real speech;
    refusals (503) end cleanly. Returns SIPp's result and the rows of answered calls."""
    call = pool.call(call_ms=9000, rtp_bind=False, accept_refusal=True)
    result = pool.run(siprec_scenario(call), name, calls=calls, rate=20, timeout_s=60)
    assert result.ok, result.errors[-1500:] + result.stdout[-1500:]
    assert len(result.calls) == calls
    answered = [c.call_id for c in result.calls.values() if c.answered_at is not None]
    return result, pool.stored_many(answered, timeout=90)


def _assert_recorded(
    result: SippResult, rows: dict[str, RecordingRow], pool: Pool, tmp: Path
) -> None:
    """Each answered call: its times, 2 channels of speech, the call's length, no flag."""
    for call_id, row in rows.items():
        log = result.calls[call_id]
        assert_times(row, log.answered_at, log.bye_at)
        assert abs(row.duration_ms - 9000) <= 500, row.duration_ms
        assert row.channels == 2 and flags(row) == set(), row.flags
        channels, samples = audio = decode(pool.export(row, tmp / f"{row.recording_id}.ogg"))
        seconds = len(samples) / channels / 8000
        assert abs(seconds * 1000 - row.duration_ms) <= 300, (seconds, row.duration_ms)
        assert window_rms(audio, 0, 0.5, 7.0) > 500 and window_rms(audio, 1, 0.5, 7.0) > 500


def test_load_30_calls_on_8_workers_are_all_recorded(idle: Pool, tmp_path: Path) -> None:
    result, rows = _load(idle, 30, "load30")
    assert len(rows) == 30 and not [c for c in result.calls.values() if c.refused_status]
    _assert_recorded(result, rows, idle, tmp_path)
    dispatched = re.findall(r"event=front_dispatched call_ref=(\S+) worker=(w\d+)", idle.text())
    per_worker = Counter(w for ref, w in dispatched if ref in {r.call_ref for r in rows.values()})
    assert sorted(per_worker.values()) == [3, 3, 4, 4, 4, 4, 4, 4], per_worker
    idle.wait_idle()


def test_over_capacity_calls_are_refused_and_the_rest_recorded(idle: Pool, tmp_path: Path) -> None:
    """40 calls on 32 slots: 8 SRC sessions see 503, the 32 others are recorded whole."""
    refused_before = idle.text().count("event=front_refused")
    result, rows = _load(idle, 40, "load40")
    refused = [c for c in result.calls.values() if c.refused_status is not None]
    assert [c.refused_status for c in refused] == [503] * 8
    assert len(rows) == 32
    _assert_recorded(result, rows, idle, tmp_path)
    lines = idle.text().count("event=front_refused")
    assert lines - refused_before == 8
    assert f"refused_total={lines}" in idle.text()
    assert "event=front_failover" not in idle.text()
    idle.wait_idle()  # the refused calls left no load behind


# ---------------------------------------------------------------- a worker dies (slow)


def test_killed_worker_is_routed_around_and_its_calls_recovered(
    small_pool: Pool, tmp_path: Path
) -> None:
    """Calls alternate over two workers (call load, ties by priority): w0 gets the four
    long ones. w0 is SIGKILLed mid-call and the agent frozen (so that it cannot restart
    w0 yet): once its calls' BYEs have freed it, the front tries w0 for new calls only
    until a probe or an INVITE timed out (1 s probe, 1 s fr_timer), then sends them all
    to w1. Thawed, the agent restarts w0, which recovers the four partial recordings:
    stored flagged incomplete, with the audio up to the kill."""
    pool = small_pool
    first: list[Future[SippResult]] = []
    later: list[tuple[float, Future[SippResult]]] = []
    assert pool.agent.process is not None
    with ThreadPoolExecutor(24) as executor:
        for n in range(8):  # long on w0, short on w1
            call = pool.call(call_ms=4500 if n % 2 == 0 else 2000)
            first.append(executor.submit(pool.place, call, f"first{n}", 20.0))
            time.sleep(0.15)
        time.sleep(2.8)
        _signal(pool.worker_pids()[0], signal.SIGKILL)
        _signal(pool.agent.process.pid, signal.SIGSTOP)
        killed_at = time.time()
        try:
            out_at = _follow(pool, executor, later, killed_at + 4.5)
        finally:
            _signal(pool.agent.process.pid, signal.SIGCONT)
        firsts = [f.result() for f in first]
        afters = [(started, f.result()) for started, f in later]
    bound = killed_at + 1.0 + 1.0 + 0.5  # probe interval + fr_timer + slack
    assert out_at is not None and out_at <= bound, (out_at, killed_at)
    text = pool.text()
    workers = dict(re.findall(r"event=front_dispatched call_ref=(\S+) worker=(w\d)", text))
    failed_over = set(re.findall(r"event=front_failover call_ref=(\S+) worker=w0", text))
    assert len(afters) >= 8
    for started, result in afters:
        assert result.ok and result.answered_at is not None, result.errors[-1500:]
        ref = call_ref(result.call_id or "")
        if started > bound:  # w0 is out of rotation: straight to w1, answered at once
            assert workers[ref] == "w1" and ref not in failed_over, (ref, started - killed_at)
            assert result.answered_at - started < 0.5
    _assert_recovered(pool, firsts, killed_at, tmp_path)
    pool.wait_idle()


def _follow(
    pool: Pool,
    executor: ThreadPoolExecutor,
    later: list[tuple[float, Future[SippResult]]],
    until: float,
) -> float | None:
    """New short calls every 0.5 s until ``until`` (w1 alone can take them, also while
    some wait 1 s on the dead w0); returns when the front first showed
    w0 out of rotation (``kamcmd dispatcher.list``)."""
    out_at: float | None = None
    next_call = time.time() + 0.2
    while time.time() < until:
        if time.time() >= next_call:
            call = pool.call(call_ms=600)
            later.append((time.time(), executor.submit(pool.place, call, "later", 20.0)))
            next_call += 0.5
        if out_at is None and not pool.destinations()[0].active:
            out_at = time.time()
        time.sleep(0.05)
    return out_at


def _assert_recovered(
    pool: Pool, firsts: list[SippResult], killed_at: float, tmp_path: Path
) -> None:
    long_calls, short_calls = firsts[0::2], firsts[1::2]
    for result in short_calls:
        assert result.ok, result.errors[-1500:]
    text = pool.text()
    for result in long_calls:
        assert f"call_ref={call_ref(result.call_id or '')} worker=w0" in text
    rows = pool.stored_many([r.call_id or "" for r in firsts])
    for result in long_calls:
        row = rows[result.call_id or ""]
        assert result.answered_at is not None
        assert flags(row) == {"incomplete"}, row.flags
        assert row.channels == 2
        # The WAV header said 0 bytes; the audio up to the kill was recovered.
        audio = decode(pool.export(row, tmp_path / f"{row.recording_id}.ogg"))
        seconds = len(audio[1]) / audio[0] / 8000
        assert abs(seconds - (killed_at - result.answered_at)) < 0.5, (seconds, killed_at)
        assert window_rms(audio, 0, 0.5, 2.5) > 500 and window_rms(audio, 1, 0.5, 2.5) > 500
        # The end is what the audio on disk and the heartbeat prove (not a file's mtime).
        assert abs(row.ended_at_ms / 1000 - killed_at) < 0.5, (row.ended_at_ms, killed_at)
    for result in short_calls:
        assert flags(rows[result.call_id or ""]) == set()
    text = pool.text()
    assert text.count("event=capture_recovered") == 4
    assert "event=worker_died index=0" in text


def test_shutdown_drains_calls_through_the_front(small_pool: Pool) -> None:
    """SIGTERM to the agent: new calls are refused (503), the call in progress goes on
    until its BYE (through the front, which stops last) and is stored whole."""
    pool = small_pool
    with ThreadPoolExecutor(2) as executor:
        running = executor.submit(pool.place, pool.call(call_ms=6000), "draining", 20.0)
        time.sleep(2.0)
        assert pool.agent.process is not None
        pool.agent.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = pool.place(pool.call(call_ms=1000, accept_refusal=True), "late", 10.0)
        result = running.result()
    assert result.ok, result.errors[-1500:]
    assert late.first is not None and late.first.refused_status == 503
    assert pool.agent.process.wait(30) == 0
    row = pool.stored(result.call_id)
    assert flags(row) == set() and abs(row.duration_ms - 6000) <= 500
    assert_times(row, result.answered_at, result.bye_at)
    text = pool.text()
    assert "status=503 reason=stopping" in text and "reason=all_refused" in text
    assert text.index("event=worker_stopped") < text.index("event=front_stopped")


def _signal(pid: int, signum: int) -> None:
    os.kill(pid, signum)
