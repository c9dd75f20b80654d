"""A recorder worker process: one pjsua2 endpoint taking up to four calls.

``startup()`` recovers what a dead predecessor left in ``captures/active/w<N>``, loads
the directory and the privacy keys, and starts SIP; ``run()`` turns the pjsua2 loop
until a stop is asked; ``shutdown()`` lets calls in progress end (up to a deadline),
hangs up the rest, finalises their captures and destroys the library.

Signals only set flags: SIGTERM/SIGINT ask for an orderly stop (new INVITEs get 503),
a second one exits at once (what was recorded is recovered on restart); SIGHUP
reloads the directory and the log level (the agent sends it when the directory file
changes, and passes its own SIGHUP on).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from agent import logs
from agent.capture import recover_active
from agent.config import AgentConfig, ConfigError, load_agent_config
from agent.directory import LiveDirectory
from agent.privacy import LookupKeys, Protector, Sealer
from agent.recorder.parties import PartyRules
from agent.recorder.sip import SipEngine

log = logs.get_logger("agent.recorder.worker")  # also when run as __main__

POLL_MS = 500  # libHandleEvents returns at once on any SIP event; this bounds idle wake-ups
PR_SET_PDEATHSIG = 1
HANGUP_WAIT_S = 3.0


def _stop_with_parent() -> None:
    """Ask the kernel for SIGTERM when the agent dies (even by SIGKILL): an orphaned
    worker would keep the SIP port its successor needs. Calls in progress still drain."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.warning("pdeathsig_unavailable")
        return
    if os.getppid() == 1:  # the agent died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


class Worker:
    def __init__(
        self,
        cfg: AgentConfig,
        index: int,
        ready_fd: int | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.index = index
        self.ready_fd = ready_fd
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._signals = 0
        self._engine: SipEngine | None = None
        self._directory: LiveDirectory | None = None

    # ------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg = self.cfg
        _stop_with_parent()
        ready_dir = cfg.captures_dir / "ready"
        active_dir = cfg.captures_dir / "active" / f"w{self.index}"
        for recording_id in recover_active(active_dir, ready_dir):
            log.warning(
                "capture_recovered",
                recording_id=recording_id,
                worker=self.index,
                flags="incomplete",
            )
        # The agent watches the file and sends SIGHUP on a change: one watcher per
        # host, not one per worker (inotify instances are limited to 128 per user).
        directory = LiveDirectory(cfg.directory_file)
        protector = Protector(
            cfg.privacy.default_region,
            LookupKeys.load(cfg.privacy.lookup_key_file),
            Sealer.load(cfg.privacy.seal_public_key_file),
        )
        rules = PartyRules.build(protector, cfg.service_numbers)
        self._directory = directory
        self._engine = SipEngine(cfg, self.index, directory, rules)
        self._engine.start()
        self._signal_ready()

    def _signal_ready(self) -> None:
        if self.ready_fd is not None:
            os.write(self.ready_fd, b"ready\n")
            self.close_ready_fd()

    def close_ready_fd(self) -> None:
        """Close the readiness pipe (a parent waiting on it sees EOF on failure)."""
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    def run(self) -> None:
        engine = self._sip()
        while not self.stop.is_set():
            engine.poll(POLL_MS)
            if self.reload.is_set():
                self.reload.clear()
                self._reload()

    def _reload(self) -> None:
        """SIGHUP: the directory, and the log level from the config file."""
        if self._directory is not None:
            self._directory.reload()
        if self.config_path is None:
            return
        try:
            level = load_agent_config(self.config_path).log_level
        except ConfigError as exc:
            log.error("reload_failed", worker=self.index, reason=str(exc), kept="previous")
        else:
            logs.set_level(level)
            log.info("reloaded", worker=self.index, log_level=level)

    def shutdown(self) -> None:
        """Stop taking calls, let those in progress end, then hang up the rest."""
        engine = self._sip()
        engine.stop_accepting()
        deadline = time.monotonic() + self.cfg.sip.drain_s
        if engine.active_calls:
            log.info(
                "worker_draining",
                worker=self.index,
                calls=engine.active_calls,
                drain_s=round(self.cfg.sip.drain_s, 1),
            )
        while engine.active_calls and time.monotonic() < deadline:
            engine.poll(POLL_MS)
        if engine.active_calls:
            log.warning("worker_hangup", worker=self.index, calls=engine.active_calls)
            engine.hangup_all()
            deadline = time.monotonic() + HANGUP_WAIT_S
            while engine.active_calls and time.monotonic() < deadline:
                engine.poll(POLL_MS)
        engine.close()
        self._engine = None

    def _sip(self) -> SipEngine:
        if self._engine is None:
            raise RuntimeError("Worker.startup() has not run")
        return self._engine

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)
        self.stop.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload.set()


def worker_main(
    cfg: AgentConfig, index: int, ready_fd: int | None, config_path: Path | None = None
) -> int:
    """Entry point of ``callrec worker``; logging is configured by the caller."""
    worker = Worker(cfg, index, ready_fd, config_path)
    worker.install_signal_handlers()
    try:
        worker.startup()
    except Exception:
        log.exception("worker_start_failed", worker=index)
        worker.close_ready_fd()
        return 1
    log.info("worker_ready", worker=index, pid=os.getpid())
    try:
        worker.run()
    finally:
        worker.shutdown()
    log.info("worker_stopped", worker=index)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.recorder.worker")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = load_agent_config(args.config)
    logs.configure(cfg.log_level, identifier="callrec-agent")
    return worker_main(cfg, args.index, args.ready_fd, args.config)


if __name__ == "__main__":
    raise SystemExit(main())
