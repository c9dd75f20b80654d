"""The agent's worker supervision with real processes that stand in for workers (the
pjsua2 workers themselves are killed and restarted in test_pool.py): a worker that
dies is started again at once, one that keeps dying waits longer each time, and one
that ran well for a while starts its backoff afresh."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from agent import metrics
from agent.recorder import daemon as daemon_module
from agent.recorder.daemon import RESTART_BACKOFF_S, AgentDaemon, WorkerProcess
from tests.support.stack import Keys, agent_config


class _Stub(AgentDaemon):
    """AgentDaemon's supervision only: workers run ``python -c <code>``."""

    def __init__(self, cfg_root: Path, keys: Keys, code: str) -> None:
        self.config, _ = agent_config(cfg_root, keys, "127.0.0.1:1")
        self.config_path = cfg_root / "agent.toml"
        self.workers = [WorkerProcess(0)]
        self.front = None
        self.metrics_dir = cfg_root / "metrics"  # a dead worker's live gauges go from here
        self.code = code

    def _worker_command(self, worker: WorkerProcess, ready_fd: int | None) -> list[str]:
        return [sys.executable, "-c", self.code]


def _until_started(stub: _Stub, pids: set[int], timeout: float = 10.0) -> int:
    """Supervise until a worker process other than ``pids`` runs; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stub._supervise(stub.workers[0])
        process = stub.workers[0].process
        if process is not None and process.pid not in pids:
            return process.pid
        time.sleep(0.02)
    pytest.fail("worker not restarted")


def test_dead_worker_is_restarted_with_growing_backoff(tmp_path: Path, keys: Keys) -> None:
    stub = _Stub(tmp_path, keys, "raise SystemExit(3)")
    worker = stub.workers[0]
    pids = {_until_started(stub, set())}
    waits = []
    for _ in range(3):
        assert worker.process is not None
        worker.process.wait(5)
        died = time.monotonic()
        pids.add(_until_started(stub, pids))
        waits.append(time.monotonic() - died)
    assert worker.restarts == 3
    assert waits[0] < 0.5  # the first restart is immediate
    assert RESTART_BACKOFF_S[1] <= waits[1] < RESTART_BACKOFF_S[1] + 0.5
    assert RESTART_BACKOFF_S[2] <= waits[2] < RESTART_BACKOFF_S[2] + 0.5
    worker.process.wait(5)  # type: ignore[union-attr]


def test_backoff_starts_afresh_after_a_healthy_run(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_module, "HEALTHY_S", 0.3)
    stub = _Stub(tmp_path, keys, "import time; time.sleep(0.5)")
    worker = stub.workers[0]
    first = _until_started(stub, set())
    worker.restarts = 4  # it had a bad time earlier
    assert worker.process is not None
    worker.process.wait(5)
    start = time.monotonic()
    _until_started(stub, {first})
    assert time.monotonic() - start < 0.5 and worker.restarts == 1
    worker.process.kill()
    worker.process.wait(5)


def test_a_dead_workers_calls_leave_the_calls_active_gauge(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed with a call up wrote calls_active 1 in its metrics file; once
    the agent sees it dead the call no longer counts (the successor starts at 0)."""
    stub = _Stub(tmp_path, keys, "")
    metrics.reset_multiprocess_dir(stub.metrics_dir)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(stub.metrics_dir))
    stub.code = "from agent import metrics; metrics.CALLS_ACTIVE.inc(); raise SystemExit(9)"
    first = _until_started(stub, set())
    assert stub.workers[0].process is not None
    stub.workers[0].process.wait(5)
    assert metrics.calls_active(stub.metrics_dir) == 1  # as the dead worker left it
    stub.code = "import time; time.sleep(30)"
    _until_started(stub, {first})
    assert metrics.calls_active(stub.metrics_dir) == 0
    stub.workers[0].process.kill()
    stub.workers[0].process.wait(5)
