"""The recording agent: supervises the SIP worker processes (their pool:
:mod:`agent.recorder.pool`) and runs finalize and the uplink. ``startup()`` / ``run()``
/ ``shutdown()``; signal handlers only set events.

Shutdown is ordered and bounded: workers stop taking calls and finish the ones in
progress (their own deadline), finalize drains what they left, the uplink keeps
uploading for the grace period, and whatever is left stays safely in the outbox.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from prometheus_client.registry import Collector

from agent import logs, metrics, sdnotify
from agent.config import AgentConfig, ConfigError, load_agent_config
from agent.directory import LiveDirectory
from agent.privacy import Sealer
from agent.recorder.control.api import ControlServer
from agent.recorder.control.desk import ControlDesk
from agent.recorder.finalize import Finalizer
from agent.recorder.loops import DirectoryQueue, FileWatcher
from agent.recorder.pool import WorkerPool, WorkerStartError
from agent.recorder.quarantine import expire as expire_quarantine
from agent.recorder.signals import Flag, Wakeup
from agent.recorder.spool.pickup import SpoolPickup
from agent.recorder.status import STATUS_INTERVAL_S, agent_status
from agent.recorder.uplink.backpressure import OutboxMonitor
from agent.recorder.uplink.client import Uplink
from agent.recorder.uplink.live import LiveUplink
from agent.recorder.uplink.outbox import Outbox

log = logs.get_logger(__name__)
QUARANTINE_CHECK_S = 3600.0


class AgentDaemon:
    def __init__(self, config: AgentConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        # Set by signal handlers: flags, never a threading.Event (see agent.recorder.signals).
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
        self.control: ControlServer | None = None  # [control]: the recording control API
        self.metrics_dir = _metrics_dir(config)
        self.pool = WorkerPool(config, config_path, self.metrics_dir)
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
        metrics.WORKERS_CONFIGURED.set(len(self.pool.workers))
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
        self.pool.start()
        log.info(
            "agent_ready",
            site=cfg.site,
            workers=len(self.pool.workers),
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
            self.pool.supervise()
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
        up = self.pool.up()
        metrics.WORKERS_UP.set(up)
        try:
            calls = metrics.calls_active(self.metrics_dir)
        except (OSError, ValueError):  # a worker's file being created: next time
            calls = 0
        line = agent_status(
            up,
            len(self.pool.workers),
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
        self.pool.stop()  # the control API still serves the calls draining
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
            self.pool.kill()
            os._exit(1)
        self.stop_event.set()


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
    daemon.pool.signal(signal.SIGHUP)
