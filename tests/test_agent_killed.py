"""The agent's main process SIGKILLed during calls and started again 2 s later (as an
operator or a supervisor would), with its own Kamailio front (``run_front``) and
workers: the workers finish their calls (however many times the kernel tells them their
parent died), the restarted agent replaces the stale front and waits for the old
workers before starting theirs, every call is stored once and whole, and no process of
either run is left behind."""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.recorder.sip import call_ref
from tests.support.audio import decode
from tests.support.daemons import Daemon
from tests.support.pool import Pool, assert_times, flags, running_pool

pytestmark = [pytest.mark.slow, pytest.mark.sip, pytest.mark.alone]

# Speech for the first ~7 s, then no RTP (silence is recorded; rtp_timeout is raised
# for it): long enough that the restarted agent, slow to start on a loaded host (8 s
# seen at load 18), still finds the old workers draining.
CALL_MS = 15000


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _processes_under(root: Path) -> list[str]:
    """Live processes whose command line names a file under ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(root) in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _restart(pool: Pool) -> Daemon:
    old = pool.agent
    again = Daemon("agent", old.args, old.log, old.env)
    seen = len(old.text())
    again.start().wait_for(r"event=agent_ready", timeout=60, after=seen)
    return again


def _wait_answered(pool: Pool, calls: int, timeout: float) -> None:
    """Until the workers have answered ``calls`` calls (each SIPp starts in its own
    process: a fixed sleep would kill the agent before a late INVITE arrived)."""
    deadline = time.monotonic() + timeout
    while pool.text().count("event=call_answered") < calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.text().count("event=call_answered") >= calls, pool.tail()


def _wait_logged(pool: Pool, line: str, after: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while line not in pool.text()[after:] and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]


def test_agent_killed_mid_calls_and_restarted(tmp_path: Path) -> None:
    with running_pool(tmp_path, workers=2, rtp_timeout="30s") as pool:
        pool.wait_idle()
        old_workers = list(pool.worker_pids().values())
        old_front = int(re.findall(r"event=front_started pid=(\d+)", pool.text())[-1])
        assert pool.agent.process is not None
        with ThreadPoolExecutor(3) as executor:
            calls = [
                executor.submit(pool.place, pool.call(call_ms=CALL_MS), f"k{n}", 50.0)
                for n in range(3)
            ]
            _wait_answered(pool, 3, timeout=20.0)  # SIPp may start late on a busy host
            time.sleep(1.0)  # some audio recorded before the kill
            killed_at = len(pool.text())
            pool.agent.process.send_signal(signal.SIGKILL)
            pool.agent.process.wait(10)
            time.sleep(2.0)
            pool.agent = _restart(pool)
            results = [call.result() for call in calls]
        for result in results:
            assert result.ok, result.errors[-1500:]
        rows = pool.stored_many([r.call_id or "" for r in results], timeout=60)
        for result in results:
            row = rows[result.call_id or ""]
            assert flags(row) == set(), row.flags  # whole: nothing cut, nothing recovered
            assert_times(row, result.answered_at, result.bye_at)
            audio = decode(pool.export(row, tmp_path / f"{row.recording_id}.ogg"))
            seconds = len(audio[1]) / audio[0] / 8000
            assert result.answered_at is not None and result.bye_at is not None
            assert abs(seconds - (result.bye_at - result.answered_at)) <= 0.5, seconds
        refs = [r.call_ref for r in pool.catalog.list(limit=5000)]
        assert sorted(refs) == sorted(call_ref(r.call_id or "") for r in results), "each once"
        _wait_gone([*old_workers, old_front], timeout=20)
        # The agent logs the replacement just after its kill: the line may trail the exit.
        _wait_logged(pool, "event=front_stale_killed", after=killed_at, timeout=10.0)
        after = pool.text()[killed_at:]
        assert "event=previous_workers_draining" in after
        # The previous front relayed the old calls to their end (replacing it sooner
        # lost a BYE or its 200 in flight), then ours took over.
        assert "event=front_kept" in after
        assert after.index("event=front_stale_killed") > after.rindex("event=call_recorded")
        assert after.count("event=agent_gone") == len(old_workers)  # once each, drained
        assert "event=capture_recovered" not in after and "event=worker_died" not in after
        pool.wait_idle()  # the new workers took their slots and ports over
        new_workers = pool.worker_pids()
        assert set(new_workers.values()).isdisjoint(old_workers)
        # Read again: the new workers start once the old ones have drained and gone, so
        # their ready lines may come after ``after`` was read.
        _wait_logged(pool, "event=worker_ready", after=killed_at, timeout=10.0)
        assert "event=worker_ready" in pool.text()[killed_at:]
    assert _processes_under(tmp_path) == []
