"""Workers forked from the zygote (``[sip] worker_start = "fork"``) keep what the pool
promises of a worker: the agent is its parent (it reads its exit code and restarts it),
it drains when the agent dies, a dead zygote takes no worker with it, and the agent then
starts a new one for the next worker. The workers forked here are real
pjsua2 workers; the "agent" of the first two tests is a small process (a subreaper
must not be the test runner itself)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.recorder.zygote import parent_of, process_name
from tests.support.daemons import REPO
from tests.support.pool import running_pool
from tests.support.stack import Keys, agent_config, write_toml

pytestmark = pytest.mark.sip

# The agent's part, as its WorkerPool plays it: subreaper, zygote, one forked worker.
AGENT = """
import json, os, select, signal, sys, time
from pathlib import Path
from agent.recorder.zygote import Zygote, ZygoteError, become_subreaper, parent_of

def say(**what):
    print(json.dumps(what), file=sys.stderr, flush=True)

become_subreaper()
zygote = Zygote(Path(sys.argv[1]), dict(os.environ))
zygote.start()
read_fd, write_fd = os.pipe()
worker = zygote.spawn(0, write_fd)
os.close(write_fd)
select.select([read_fd], [], [], 30)
say(worker=worker.pid, zygote=zygote.process.pid, ready=os.read(read_fd, 64).decode(),
    parent=parent_of(worker.pid), agent=os.getpid())
if sys.argv[2] == "stay":
    time.sleep(120)
zygote.process.kill()
zygote.process.wait(5)
time.sleep(0.5)
alive = worker.poll() is None
try:
    zygote.spawn(1, None)
    refused = ""
except ZygoteError as exc:
    refused = str(exc)
worker.kill()
say(alive_after_zygote=alive, code=worker.wait(10), refused=refused)
"""


def _config(tmp_path: Path, keys: Keys) -> Path:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:1", sip={"drain": "2s"})
    return write_toml(tmp_path / "agent.toml", doc)


def _agent(tmp_path: Path, config: Path, mode: str) -> subprocess.Popen[str]:
    with (tmp_path / "agent.log").open("w") as log:  # and the zygote's, the worker's
        return subprocess.Popen(
            [sys.executable, "-c", AGENT, str(config), mode],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
        )


def _line(process: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, object]:
    assert process.stderr is not None
    ready, _, _ = select.select([process.stderr], [], [], timeout)
    assert ready, "no answer from the agent process"
    found: dict[str, object] = json.loads(process.stderr.readline())
    return found


def test_a_forked_worker_is_the_agents_child_and_outlives_the_zygote(
    tmp_path: Path, keys: Keys
) -> None:
    with _agent(tmp_path, _config(tmp_path, keys), "kill-zygote") as agent:
        started = _line(agent)
        worker = int(str(started["worker"]))
        assert started["ready"] == "ready\n"
        assert started["parent"] == started["agent"]  # not the zygote's
        assert started["zygote"] != started["agent"]
        ended = _line(agent)
        assert agent.wait(20) == 0, (tmp_path / "agent.log").read_text()[-2000:]
    assert ended["alive_after_zygote"] is True
    assert ended["code"] == -signal.SIGKILL  # the agent read its worker's exit status
    assert "not running" in str(ended["refused"]) or "exited" in str(ended["refused"])
    assert not Path(f"/proc/{worker}").exists()  # reaped by the agent, no zombie left


def test_a_forked_worker_drains_and_exits_when_the_agent_is_killed(
    tmp_path: Path, keys: Keys
) -> None:
    with _agent(tmp_path, _config(tmp_path, keys), "stay") as agent:
        started = _line(agent)
        worker, zygote = int(str(started["worker"])), int(str(started["zygote"]))
        assert Path(f"/proc/{worker}/comm").read_text().strip() == process_name(0)
        agent.kill()
        agent.wait(5)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and _running(worker):
            time.sleep(0.1)
        log = (tmp_path / "agent.log").read_text()
        assert not _running(worker), log[-2000:]
        assert not _running(zygote)  # its own parent-death signal
    assert "event=agent_gone worker=0" in log and "event=worker_stopped worker=0" in log


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_agent_forks_its_workers_and_restarts_them_without_a_zygote(
    tmp_path: Path,
) -> None:
    """The pool's workers come from the zygote, are the agent's children and share its
    heap; with the zygote killed, a killed worker is still restarted (from a new zygote)
    and the pool takes calls again."""
    with running_pool(tmp_path, workers=2, sender="c") as pool:
        pool.wait_idle()
        assert pool.agent.process is not None
        agent = pool.agent.process.pid
        pids = pool.worker_pids()
        assert all(parent_of(pid) == agent for pid in pids.values())
        assert re.findall(r"event=worker_started index=\d+ pid=\d+ start=(\w+)", pool.text()) == [
            "fork",
            "fork",
        ]
        (zygote,) = map(int, re.findall(r"event=zygote_started pid=(\d+)", pool.text()))
        os.kill(zygote, signal.SIGKILL)
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and pool.worker_pids()[0] == pids[0]:
            time.sleep(0.2)
        new = pool.worker_pids()[0]
        assert new != pids[0] and parent_of(new) == agent, pool.tail()
        assert "event=zygote_died" in pool.text()
        pool.wait_idle()
        result = pool.place(pool.call(call_ms=1500), "after")
        assert result.ok, result.errors[-1500:]
        pool.stored(result.call_id)
