"""The agent's worker supervision (``agent.recorder.pool``) with real processes that
stand in for workers (the pjsua2 workers themselves are killed and restarted in
test_pool.py): a worker that dies is started again at once, one that keeps dying waits
longer each time, and one that ran well for a while starts its backoff afresh."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import metrics
from agent.recorder import pool as pool_module
from agent.recorder import worker as worker_module
from agent.recorder.ownership import WorkerSlot, slot_held, slot_holder
from agent.recorder.pool import RESTART_BACKOFF_S, WorkerPool, WorkerProcess, WorkerStartError
from tests.support.daemons import Daemon
from tests.support.stack import Keys, agent_config, write_toml


class _Stub(WorkerPool):
    """The agent's worker pool, supervision only: workers run ``python -c <code>``
    (started the ``exec`` way; test_zygote.py starts them from the zygote)."""

    def __init__(self, cfg_root: Path, keys: Keys, code: str) -> None:
        sip: dict[str, object] = {"worker_start": "exec"}
        config, _ = agent_config(cfg_root, keys, "127.0.0.1:1", sip=sip)
        # a dead worker's live gauges go from metrics_dir
        super().__init__(config, cfg_root / "agent.toml", cfg_root / "metrics")
        self.workers = [WorkerProcess(0)]
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
    monkeypatch.setattr(pool_module, "HEALTHY_S", 0.3)
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


def test_start_up_failures_say_what_happened() -> None:
    port = WorkerStartError(0, 2, "2 SIP port 127.0.0.1:5071/udp is in use by another process", 0.4)
    assert str(port) == "worker 0: SIP port 127.0.0.1:5071/udp is in use by another process"
    assert port.exit_code == 2
    crashed = WorkerStartError(1, 1, "", 1.0)
    assert (
        str(crashed) == "worker 1: exited with code 1 before it was ready (its log lines are above)"
    )
    assert crashed.exit_code == 1
    assert "killed by signal 9" in str(WorkerStartError(2, -9, "", 0.1))
    assert (
        str(WorkerStartError(3, None, "", 20.0)) == "worker 3: not ready after 20s, still starting"
    )


def test_sip_port_in_use_is_one_clear_line_and_exit_code_2(tmp_path: Path, keys: Keys) -> None:
    """Something else holds the worker's SIP port: the agent says so in one line and
    exits 2 at once (systemd's RestartPreventExitStatus=2: no restart loop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        _, doc = agent_config(tmp_path, keys, "127.0.0.1:1", sip_port=port)
        config = write_toml(tmp_path / "agent.toml", doc)
        agent = Daemon("agent", ["agent", "--config", str(config)], tmp_path / "agent.log")
        started = time.monotonic()
        process = agent.start().process
        assert process is not None
        assert process.wait(30) == 2, agent.text()
    assert time.monotonic() - started < 15
    text = agent.text()
    failed = [line for line in text.splitlines() if "event=agent_start_failed" in line]
    assert failed == [failed[0]] and "level=error" in failed[0], text
    # (the address may be blanked by the log's redaction; the port and reason are not)
    assert 'reason="worker 0: SIP port ' in failed[0]
    assert f':{port}/udp is in use by another process" exit_code=2' in failed[0]
    assert "Traceback" not in text and "RuntimeError" not in text
    assert "did not become ready" not in text


def test_a_worker_slot_waits_for_its_live_holder_and_not_for_a_dead_one(tmp_path: Path) -> None:
    """A previous worker (another process) holds slot w0 until it exits: the next one
    waits, told its pid once, and takes the slot the moment the holder is gone."""
    active = tmp_path / "active" / "w0"
    command = [sys.executable, "-c", HOLD_SLOT, str(active)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert slot_held(active) and slot_holder(active) == holder.pid
        waits: list[int | None] = []
        started = time.monotonic()
        slot = WorkerSlot.acquire(active, lambda p, _: waits.append(p), lambda: False, 0.05)
        assert slot is not None and set(waits) == {holder.pid} and len(waits) >= 5
        assert holder.wait(5) == 0 and time.monotonic() - started >= 0.5
    assert slot_holder(active) == os.getpid()
    slot.release()
    assert not slot_held(active)
    stopped = WorkerSlot.acquire(active, lambda p, _: None, lambda: True)  # free: at once
    assert stopped is not None
    stopped.release()


HOLD_SLOT = """
import sys, time
from pathlib import Path
from agent.recorder.ownership import WorkerSlot
slot = WorkerSlot.acquire(Path(sys.argv[1]), print, lambda: False)
print("held", flush=True)
time.sleep(1.0)
"""


# A forked worker's command line is the zygote's; its name says which slot it is.
FORKED = "open('/proc/self/comm', 'w').write('callrec-w0')\n"


@pytest.mark.parametrize("start", ["exec", "fork"])
def test_a_hung_predecessor_is_killed_past_its_drain_deadline(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    """A previous worker of slot w0 that still holds it long after ``[sip] drain``
    (and its hang-up and close) is hung: the new worker kills it and starts; a process
    that is not this slot's worker is never killed."""
    monkeypatch.setattr(worker_module, "PREDECESSOR_MARGIN_S", 0.5)
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip={"drain": "1s"})
    active = cfg.captures_dir / "active" / "w0"
    code = HOLD_SLOT.replace("1.0", "60")
    fake = [sys.executable, "-c", code, str(active), "agent.recorder.worker", "--index", "0"]
    if start == "fork":
        fake = [sys.executable, "-c", FORKED + code, str(active), "agent.recorder.zygote"]
    with subprocess.Popen(fake, stdout=subprocess.PIPE, text=True) as hung:
        assert hung.stdout is not None and hung.stdout.readline() == "held\n"
        worker = worker_module.Worker(cfg, 0)
        started = time.monotonic()
        slot = WorkerSlot.acquire(active, worker._waiting, worker.stop.is_set, 0.05)
        assert slot is not None and hung.wait(5) == -signal.SIGKILL
        assert 1.5 <= time.monotonic() - started < 5.0
        slot.release()


def test_a_stranger_holding_the_slot_is_left_alone(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip={"drain": "1s"})
    active = cfg.captures_dir / "active" / "w0"
    stranger = [sys.executable, "-c", HOLD_SLOT.replace("1.0", "60"), str(active)]
    with subprocess.Popen(stranger, stdout=subprocess.PIPE, text=True) as other:
        assert other.stdout is not None and other.stdout.readline() == "held\n"
        worker = worker_module.Worker(cfg, 0)
        worker._waiting(other.pid, 60.0)  # long past any deadline
        time.sleep(0.2)
        assert other.poll() is None and worker._evicted
        other.kill()


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
