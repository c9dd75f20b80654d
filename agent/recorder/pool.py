"""The agent's SIP worker processes, the front (Kamailio) before them and the zygote
they are forked from: started all at once, awaited until each listens, restarted when
one dies (with a growing backoff), drained at the stop. The daemon
(:mod:`agent.recorder.daemon`) drives it from its main loop."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent import logs, metrics
from agent.config import AgentConfig
from agent.recorder.front.kamailio import (
    FrontProcess,
    kill_stale_front,
    stale_front_alive,
    write_front_files,
)
from agent.recorder.ownership import slot_held, slot_holder
from agent.recorder.zygote import ForkedWorker, Zygote, ZygoteError, become_subreaper, reap_orphans

log = logs.get_logger(__name__)

# All workers start at once: their start-up (imports, pjsua) shares the host's cores.
WORKER_READY_TIMEOUT_S = 20.0
WORKER_READY_EACH_S = 0.25  # more per worker: 256 workers get 84 s (systemd allows 90 s)
# After [sip] drain a worker hangs up what is left (3 s), closes its files and
# destroys pjsua (~1 s); past this margin it is killed (its captures are recovered).
WORKER_STOP_MARGIN_S = 15.0
# The first restart is immediate (its calls' BYEs are already failing); a worker that
# keeps dying waits longer each time, and starts afresh after HEALTHY_S of good running.
RESTART_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_S = 60.0
ZYGOTE_RETRY_S = 30.0  # a zygote that failed to start is tried again after this
ORPHAN_CHECK_S = 30.0


@dataclass
class WorkerProcess:
    index: int
    process: subprocess.Popen[bytes] | ForkedWorker | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    ready_fd: int | None = None  # read end of the readiness pipe while it starts

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


class WorkerPool:
    """The workers of one agent (``[sip] workers``), their front and their zygote."""

    def __init__(self, config: AgentConfig, config_path: Path, metrics_dir: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics_dir = metrics_dir  # a dead worker's live gauges are zeroed here
        self.workers = [WorkerProcess(i) for i in range(config.sip.workers)]
        self.front: FrontProcess | None = None  # [sip] run_front: Kamailio run by us
        # Slots whose previous workers drain through the previous run's front: ours
        # replaces it once they are gone (see start).
        self._front_after: set[int] = set()
        self.zygote: Zygote | None = None  # [sip] worker_start = "fork"
        self._zygote_retry = 0.0  # monotonic time of the next start after a failure
        self._orphans_checked = 0.0
        self._subreaper = False

    def supervise(self) -> None:
        """One turn of the main loop: restart dead workers and the front, reap orphans."""
        for worker in self.workers:
            self._supervise(worker)
        self._supervise_front()
        self._reap_orphans()

    def up(self) -> int:
        """Workers whose process runs."""
        return sum(1 for w in self.workers if w.process is not None and w.process.poll() is None)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every running worker."""
        for worker in self.workers:
            worker.signal(signum)

    def kill(self) -> None:
        """A forced exit: every worker and the front killed at once."""
        self.signal(signal.SIGKILL)
        if self.front is not None:
            self.front.kill()

    def _worker_command(self, worker: WorkerProcess, ready_fd: int | None) -> list[str]:
        # The worker's own entry point (= `callrec worker`): importing agent.cli.main would
        # load gRPC and the store's code into every worker (~26 MB PSS each, measured).
        command = [
            sys.executable,
            "-m",
            "agent.recorder.worker",
            "--config",
            str(self.config_path),
            "--index",
            str(worker.index),
        ]
        return command if ready_fd is None else [*command, "--ready-fd", str(ready_fd)]

    def start(self) -> None:
        """Render the front's files, start every worker at once and wait until each
        listens; then the front (with ``run_front``), which probes them from then on.

        Workers of a killed agent may still be draining calls (they hold their slots
        and SIP ports): their successors wait for them (they are not awaited here).
        Those calls' BYEs pass through the front: the previous run's, if it still
        runs, until those workers are gone (replacing it now lost a BYE or its 200 in
        flight: a recording ended late, an SRC without an answer); else ours, first."""
        sip = self.config.sip
        if sip.worker_start == "fork":
            self._start_zygote()
        if sip.front:
            files = write_front_files(self.config)
            if sip.run_front:
                self.front = FrontProcess(self.config, files)
        busy = self._previous_workers()
        if busy and self.front is not None:
            if stale_front_alive(self.front.files):
                self._front_after = set(busy)
                log.info("front_kept", reason="previous_workers_draining", until="they_exit")
            else:
                self.front.start()
        for worker in self.workers:
            self._spawn_worker(worker, ready_pipe=worker.index not in busy)
        wait = WORKER_READY_TIMEOUT_S + WORKER_READY_EACH_S * len(self.workers)
        deadline = time.monotonic() + wait
        for worker in self.workers:
            if worker.index not in busy:
                self._await_ready(worker, deadline)
        if self.front is not None and not busy:
            self.front.start()

    def _supervise_front(self) -> None:
        """Ours replaces the previous run's front once its workers are gone (or it
        died); from then on it is restarted if it dies."""
        if self.front is None:
            return
        if self._front_after:
            held = any(self._held_by_previous(self.workers[i]) for i in self._front_after)
            if held and stale_front_alive(self.front.files):
                return
            self._front_after = set()
        self.front.supervise()  # starts ours (replacing the previous) if none runs

    def _held_by_previous(self, worker: WorkerProcess) -> bool:
        """The slot is held, and not by our worker (which takes it over at once)."""
        active = self.config.captures_dir / "active" / f"w{worker.index}"
        ours = worker.process.pid if worker.process is not None else None
        return slot_held(active) and slot_holder(active) != ours

    def _previous_workers(self) -> dict[int, int | None]:
        """Slots still held by a previous agent's workers: index → their pid."""
        busy: dict[int, int | None] = {}
        for worker in self.workers:
            active = self.config.captures_dir / "active" / f"w{worker.index}"
            if slot_held(active):
                busy[worker.index] = slot_holder(active)
        if busy:
            log.warning(
                "previous_workers_draining", workers=",".join(f"w{i}" for i in busy),
                pids=",".join(str(p) for p in busy.values()), action="start_after_they_exit",
            )  # fmt: skip
        return busy

    def stop(self) -> None:
        """Workers stop taking calls (503: the front tries the next, then refuses) and
        drain for ``[sip] drain``; the front stops last, because the BYEs of calls in
        progress pass through it."""
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.sip.drain_s + WORKER_STOP_MARGIN_S
        for worker in self.workers:
            self._reap(worker, deadline)
        self._stop_zygote()
        if self.front is not None:
            self.front.stop()
            if self._front_after:  # never replaced: no front outlives the agent
                kill_stale_front(self.front.files)

    def _spawn_worker(self, worker: WorkerProcess, ready_pipe: bool) -> None:
        read_fd, write_fd = os.pipe() if ready_pipe else (None, None)
        try:
            worker.process = self._fork_worker(worker.index, write_fd)
            if worker.process is None:
                worker.process = subprocess.Popen(
                    self._worker_command(worker, write_fd),
                    pass_fds=() if write_fd is None else (write_fd,),
                    stdin=subprocess.DEVNULL,
                    env=_worker_env(),
                )
        except OSError:
            if read_fd is not None:
                os.close(read_fd)
            raise
        finally:
            if write_fd is not None:
                os.close(write_fd)
        worker.ready_fd, worker.started_at = read_fd, time.monotonic()
        forked = isinstance(worker.process, ForkedWorker)
        log.info(
            "worker_started", index=worker.index, pid=worker.process.pid,
            start="fork" if forked else "exec",
        )  # fmt: skip

    # ------------------------------------------------------------ the zygote

    def _start_zygote(self) -> None:
        """Workers are forked from it; without it (it failed) they start as before."""
        try:
            if not self._subreaper:
                become_subreaper()  # forked workers are re-parented to us
                self._subreaper = True
            self.zygote = Zygote(self.config_path, _worker_env())
            self.zygote.start()
        except (OSError, ZygoteError) as exc:
            log.error(
                "zygote_start_failed", reason=str(exc), action="exec_workers",
                retry_in_s=ZYGOTE_RETRY_S,
            )  # fmt: skip
            self._zygote_retry = time.monotonic() + ZYGOTE_RETRY_S
            self._stop_zygote()

    def _fork_worker(self, index: int, ready_fd: int | None) -> ForkedWorker | None:
        """The worker forked from the zygote; None: start it the ``exec`` way."""
        if self.config.sip.worker_start != "fork":
            return None
        zygote = self.zygote
        if zygote is not None and not zygote.alive:
            log.error("zygote_died", pid=zygote.process.pid if zygote.process else None)
            self._stop_zygote()
        if self.zygote is None and time.monotonic() >= self._zygote_retry:
            self._start_zygote()
        if self.zygote is None:
            return None
        try:
            return self.zygote.spawn(index, ready_fd)
        except ZygoteError as exc:
            log.error("worker_fork_failed", index=index, reason=str(exc), action="exec_worker")
            self._stop_zygote()
            self._zygote_retry = time.monotonic() + ZYGOTE_RETRY_S
            return None

    def _stop_zygote(self) -> None:
        zygote, self.zygote = self.zygote, None
        if zygote is None:
            return
        zygote.stop()
        if zygote.process is not None:  # its zeroed metric files, as for a worker
            metrics.worker_exited(self.metrics_dir, zygote.process.pid)

    def _reap_orphans(self) -> None:
        """As a subreaper we inherit the children of a Kamailio that died."""
        now = time.monotonic()
        if not self._subreaper or now - self._orphans_checked < ORPHAN_CHECK_S:
            return
        self._orphans_checked = now
        front = self.front.pid if self.front is not None else None
        reaped = reap_orphans(frozenset() if front is None else frozenset({front}))
        if reaped:
            log.info("orphans_reaped", processes=reaped)

    def _await_ready(self, worker: WorkerProcess, deadline: float) -> None:
        """Wait for the worker's "ready"; else say what happened: the reason it wrote
        on the pipe and its exit code, or that it is still starting after the wait."""
        fd, worker.ready_fd = worker.ready_fd, None
        assert fd is not None and worker.process is not None
        started = time.monotonic()
        try:
            line = _read_ready(fd, max(0.1, deadline - started))
        finally:
            os.close(fd)
        if line.startswith("ready"):
            return
        waited = time.monotonic() - started
        try:
            code: int | None = worker.process.wait(2.0 if line else 0.1)
        except subprocess.TimeoutExpired:
            code = None
        raise WorkerStartError(worker.index, code, line.removeprefix("failed ").strip(), waited)

    def _supervise(self, worker: WorkerProcess) -> None:
        """Restart a worker that died (its successor recovers its captures)."""
        process, now = worker.process, time.monotonic()
        if process is not None and process.poll() is None:
            return
        if process is not None:
            if now - worker.started_at >= HEALTHY_S:
                worker.restarts = 0
            delay = RESTART_BACKOFF_S[min(worker.restarts, len(RESTART_BACKOFF_S) - 1)]
            log.error(
                "worker_died",
                index=worker.index,
                pid=process.pid,
                exit_code=process.returncode,
                restart_in_s=round(delay, 1),
            )
            metrics.worker_exited(self.metrics_dir, process.pid)  # its calls are over
            worker.process, worker.next_start = None, now + delay
            worker.restarts += 1
        if now >= worker.next_start:
            try:
                self._spawn_worker(worker, ready_pipe=False)
            except OSError as exc:
                log.error("worker_start_failed", index=worker.index, error=str(exc))
                worker.next_start = now + RESTART_BACKOFF_S[-1]

    def _reap(self, worker: WorkerProcess, deadline: float) -> None:
        if worker.ready_fd is not None:  # startup failed before it was ready
            os.close(worker.ready_fd)
            worker.ready_fd = None
        process = worker.process
        if process is None:
            return
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker_kill", index=worker.index, reason="stop_timeout")
            process.kill()
            process.wait()


def _worker_env() -> dict[str, str]:
    """Workers report to us, not to systemd."""
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    return env


class WorkerStartError(RuntimeError):
    """A worker did not start: its index, exit code (None: still running) and reason."""

    def __init__(self, index: int, code: int | None, reason: str, waited_s: float) -> None:
        self.index, self.code = index, code
        if reason:  # "<code> <reason>", written by the worker before it exited
            reason = reason.partition(" ")[2] or reason
        elif code is None:
            reason = f"not ready after {waited_s:.0f}s, still starting"
        elif code < 0:
            reason = f"killed by signal {-code} before it was ready"
        else:
            reason = f"exited with code {code} before it was ready (its log lines are above)"
        super().__init__(f"worker {index}: {reason}")

    @property
    def exit_code(self) -> int:
        """The agent's: 2 (don't restart: the host needs fixing) when the worker said so."""
        return 2 if self.code == 2 else 1


def _read_ready(fd: int, timeout: float) -> str:
    """The worker's line on the readiness pipe; "" on EOF or timeout."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n") and len(data) < 4096:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1024) if ready else b""
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
