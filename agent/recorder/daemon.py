"""The recording agent: supervises the SIP worker processes and runs finalize and the
uplink. ``startup()`` / ``run()`` / ``shutdown()``; signal handlers only set events.

Shutdown is ordered and bounded: workers stop taking calls and finish the ones in
progress (their own deadline), finalize drains what they left, the uplink keeps
uploading for the grace period, and whatever is left stays safely in the outbox.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.registry import Collector

from agent import logs, metrics, sdnotify
from agent.config import AgentConfig, ConfigError, load_agent_config
from agent.directory import LiveDirectory
from agent.loops import DirectoryQueue, FileWatcher
from agent.privacy import Sealer
from agent.recorder.control.api import ControlServer
from agent.recorder.control.desk import ControlDesk
from agent.recorder.finalize import Finalizer
from agent.recorder.front.kamailio import (
    FrontProcess,
    kill_stale_front,
    stale_front_alive,
    write_front_files,
)
from agent.recorder.ownership import slot_held, slot_holder
from agent.recorder.quarantine import expire as expire_quarantine
from agent.recorder.spool.pickup import SpoolPickup
from agent.recorder.status import STATUS_INTERVAL_S, agent_status
from agent.recorder.uplink.backpressure import OutboxMonitor
from agent.recorder.uplink.client import Uplink
from agent.recorder.uplink.live import LiveUplink
from agent.recorder.uplink.outbox import Outbox
from agent.recorder.zygote import ForkedWorker, Zygote, ZygoteError, become_subreaper, reap_orphans
from agent.signals import Flag, Wakeup

log = logs.get_logger(__name__)
QUARANTINE_CHECK_S = 3600.0

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


class AgentDaemon:
    def __init__(self, config: AgentConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        # Set by signal handlers: flags, never a threading.Event (see agent.signals).
        self.stop_event = Flag()
        self.forced = Flag()
        self._wakeup: Wakeup | None = None  # the main loop's sleep, ended by a signal
        self._quarantine_checked = float("-inf")  # monotonic time of the last expiry pass
        self.hup_event = Flag()
        # One watcher for the host: a change is checked here once, then every worker
        # is told with SIGHUP (a watcher per worker cost an inotify instance each).
        self.directory = LiveDirectory(config.directory_file)
        self.directory_changed = threading.Event()
        self.directory_watcher = FileWatcher(config.directory_file, self.directory_changed.set)
        self.spool: SpoolPickup | None = None  # [spool]: recordings the PBX made itself
        self.workers = [WorkerProcess(i) for i in range(config.sip.workers)]
        self.front: FrontProcess | None = None  # [sip] run_front: Kamailio run by us
        # Slots whose previous workers drain through the previous run's front: ours
        # replaces it once they are gone (see _start_pool).
        self._front_after: set[int] = set()
        self.zygote: Zygote | None = None  # [sip] worker_start = "fork"
        self._zygote_retry = 0.0  # monotonic time of the next start after a failure
        self._orphans_checked = 0.0
        self._subreaper = False
        self.control: ControlServer | None = None  # [control]: the recording control API
        self.metrics_dir = _metrics_dir(config)
        self.metrics_port: int | None = None
        self.outbox = Outbox(config.outbox_dir)
        self.finalizer = Finalizer(config)
        self.uplink = Uplink(config.uplink, self.outbox, config.quarantine_dir, site=config.site)
        # [uplink] live: calls stream while they run; at hang-up they are finished at
        # the store instead of encoded here (spool pickups keep the file path).
        self.live = LiveUplink(config, self.uplink.channel) if config.uplink.live else None
        self.finalize_queue = DirectoryQueue(
            "finalize",
            config.captures_dir / "ready",
            self._hung_up,
            workers=_finalize_threads(config),
            rescan_s=config.uplink.rescan_s,
        )
        self.upload_queue = DirectoryQueue(
            "upload",
            config.outbox_dir,
            self.uplink.handle,
            workers=config.uplink.concurrency,
            rescan_s=config.uplink.rescan_s,
        )
        up = config.uplink
        self.outbox_monitor = OutboxMonitor(
            self.outbox, up.outbox_warn_bytes, up.outbox_warn_age_s, up.outbox_check_s
        )

    def _hung_up(self, recording_id: str) -> None:
        """A capture in ``ready``: finished at the store (live) or finalized here."""
        if self.live is not None and self.live.handles(recording_id):
            self.live.finish(recording_id)
        else:
            self.finalizer.handle(recording_id)

    # ------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg = self.config
        Sealer.load(cfg.privacy.seal_public_key_file)
        if cfg.privacy.lookup_key_file is not None:
            log.warning(
                "lookup_key_obsolete",
                path=str(cfg.privacy.lookup_key_file),
                action="remove [privacy] lookup_key_file and delete the file from this host",
            )
        for path in (cfg.captures_dir / "ready", cfg.outbox_dir, cfg.quarantine_dir):
            path.mkdir(parents=True, exist_ok=True)
        # Workers (started below) inherit the directory and write their metrics there;
        # always, because STATUS= counts the calls in progress from it.
        metrics.reset_multiprocess_dir(self.metrics_dir)
        os.environ[metrics.MULTIPROC_ENV] = str(self.metrics_dir)
        metrics.WORKERS_CONFIGURED.set(len(self.workers))
        if cfg.metrics_listen is not None:
            self.metrics_port = metrics.serve(
                cfg.metrics_listen, self.metrics_dir, _scrape_time_collectors(cfg)
            )
        self.finalize_queue.start()
        self.upload_queue.start()
        if self.live is not None:
            self.live.start()
        self.outbox_monitor.start()
        self.directory_watcher.start()
        if cfg.spool is not None:
            self.spool = SpoolPickup.from_config(cfg)
            self.spool.start()
        if cfg.control is not None:  # before the pool: a bad tokens file stops the start
            desk = ControlDesk(cfg, self.directory, self.outbox)
            self.control = ControlServer(cfg.control, desk).start()
        self._start_pool()
        log.info(
            "agent_ready",
            site=cfg.site,
            workers=len(self.workers),
            sip=f"{cfg.sip.listen}:{cfg.sip.port}",
            store=cfg.uplink.store_address,
            outbox=len(self.outbox.entries()),
        )
        sdnotify.ready()

    def run(self) -> None:
        interval = sdnotify.watchdog_interval()
        tick = min(1.0, interval / 2) if interval else 1.0
        next_status = 0.0
        while not self._sleep(tick):
            if self.hup_event.is_set():
                self.hup_event.clear()
                _reload(self)
            if self.directory_changed.is_set():
                self.directory_changed.clear()
                _directory_changed(self)
            for worker in self.workers:
                self._supervise(worker)
            self._supervise_front()
            self._reap_orphans()
            loops = (
                self.finalize_queue, self.upload_queue, self.outbox_monitor,
                self.directory_watcher,
            )  # fmt: skip
            spool_ok = self.spool is None or self.spool.is_alive()
            live_ok = self.live is None or self.live.is_alive()
            if not (spool_ok and live_ok and all(loop.is_alive() for loop in loops)):
                log.error("agent_loop_died", action="shutdown")
                raise SystemExit(1)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_INTERVAL_S
                self._report_status()
            self._expire_quarantine()
            sdnotify.watchdog()

    def _sleep(self, seconds: float) -> bool:
        """Up to ``seconds``, less if a signal arrives; whether a stop was asked."""
        if self._wakeup is None:
            self._wakeup = Wakeup()
        if not self.stop_event.is_set():
            self._wakeup.wait(seconds)
        return self.stop_event.is_set()

    def _report_status(self) -> None:
        """The workers-up gauge, and the STATUS= line of ``systemctl status``."""
        up = sum(1 for w in self.workers if w.process is not None and w.process.poll() is None)
        metrics.WORKERS_UP.set(up)
        try:
            calls = metrics.calls_active(self.metrics_dir)
        except (OSError, ValueError):  # a worker's file being created: next time
            calls = 0
        line = agent_status(
            up,
            len(self.workers),
            calls,
            self.outbox_monitor.last,
            metrics.quarantined(self.config.quarantine_dir),
        )
        sdnotify.status(line)

    def _expire_quarantine(self) -> None:
        """Hourly: quarantined recordings go after [agent] quarantine_max_age."""
        if time.monotonic() - self._quarantine_checked < QUARANTINE_CHECK_S:
            return
        self._quarantine_checked = time.monotonic()
        try:
            expire_quarantine(self.config.quarantine_dir, self.config.quarantine_max_age_s)
        except OSError as exc:
            log.error("quarantine_expiry_failed", error=str(exc))

    def shutdown(self) -> None:
        sdnotify.stopping()
        log.info("agent_stopping")
        self._stop_pool()  # the control API still serves the calls draining
        if self.control is not None:
            self.control.stop()
        if self.spool is not None:  # finish the file in hand; finalize drains what it made
            self.spool.stop()
            self.spool.join(30.0)
        self.finalize_queue.scan()
        self.finalize_queue.wait_idle(timeout=60.0)
        self.finalize_queue.stop()
        if self.live is not None:
            self.live.stop()
        if not self.forced.is_set():
            self.upload_queue.scan()
            self.upload_queue.wait_idle(timeout=self.config.uplink.grace_s)
        self.uplink.stop_event.set()
        self.upload_queue.stop()
        self.outbox_monitor.stop()
        self.directory_watcher.stop()
        self.finalize_queue.join(5.0)
        self.upload_queue.join(5.0)
        self.outbox_monitor.join(5.0)
        self.directory_watcher.join(2.0)
        self.uplink.close()
        left = self.outbox.entries()
        log.info("agent_stopped", outbox_left=len(left))
        if self._wakeup is not None:
            self._wakeup.close()

    def request_stop(self) -> None:
        if self.stop_event.is_set():
            log.warning("agent_forced_exit")
            self.forced.set()
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
            if self.front is not None:
                self.front.kill()
            os._exit(1)
        self.stop_event.set()

    # ------------------------------------------------------------ workers

    def _worker_command(self, worker: WorkerProcess, ready_fd: int | None) -> list[str]:
        # The worker's own entry point (= `callrec worker`): importing agent.cli would
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

    def _start_pool(self) -> None:
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

    def _stop_pool(self) -> None:
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


# Live: a hang-up is one Finish (waiting on the network, not the CPU), so a burst of
# hang-ups is finished by this many threads at once, not one per core (16 saturated
# with 400 calls ending together: hang-ups waited for a thread). With the live loop's
# 16 they stay under the store's 64 streams per connection.
LIVE_FINISH_THREADS = 24


def _finalize_threads(config: AgentConfig) -> int:
    """Threads for captures/ready: one encoder per core, more when they mostly finish
    live calls at the store."""
    encoders = config.audio.workers or os.cpu_count() or 1
    return max(encoders, LIVE_FINISH_THREADS) if config.uplink.live else encoders


def _metrics_dir(config: AgentConfig) -> Path:
    """Workers' metric files are memory-mapped: on a full disk, touching a new page of
    one kills the process (SIGBUS, measured on a full tmpfs). Under systemd they live in
    the runtime directory (RAM) instead; elsewhere beside the data."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime) / "metrics" if runtime else config.data_dir / "metrics"


def _scrape_time_collectors(cfg: AgentConfig) -> list[Collector]:
    collectors: list[Collector] = [
        metrics.DiskSpace(cfg.data_dir),
        metrics.Quarantine(cfg.quarantine_dir),
    ]
    tls = cfg.uplink.tls
    if tls is not None:
        collectors.append(metrics.CertificateExpiry({"client": tls.cert_file, "ca": tls.ca_file}))
    return collectors


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


def run_agent(config: AgentConfig, config_path: Path) -> int:
    daemon = AgentDaemon(config, config_path)
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.hup_event.set())
    try:
        daemon.startup()
        daemon.run()
    except WorkerStartError as exc:
        log.error("agent_start_failed", reason=str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    finally:
        daemon.shutdown()
    return 0


def _reload(daemon: AgentDaemon) -> None:
    """SIGHUP: the log level from the config file, the directory everywhere, the control
    API's tokens."""
    try:
        level = load_agent_config(daemon.config_path).log_level
    except ConfigError as exc:
        log.error("reload_failed", reason=str(exc), kept="previous")
    else:
        logs.set_level(level)
        log.info("reloaded", log_level=level)
    daemon.directory.reload()
    _tell_directory_users(daemon)
    if daemon.control is not None:
        daemon.control.reload_tokens()


def _directory_changed(daemon: AgentDaemon) -> None:
    """The directory file changed: check it once here; only a good, different
    directory is passed on (a broken edit is logged once and changes nothing)."""
    before = daemon.directory.version
    if daemon.directory.reload() and daemon.directory.version != before:
        _tell_directory_users(daemon)


def _tell_directory_users(daemon: AgentDaemon) -> None:
    if daemon.spool is not None:
        daemon.spool.reload_directory()
    for worker in daemon.workers:
        worker.signal(signal.SIGHUP)
