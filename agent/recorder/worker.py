"""A recorder worker process: one pjsua2 endpoint taking up to four calls.

``startup()`` recovers what a dead predecessor left in ``captures/active/w<N>``, loads
the directory and the privacy keys, and starts SIP; ``run()`` turns the pjsua2 loop
until a stop is asked; ``shutdown()`` lets calls in progress end (up to a deadline),
hangs up the rest, finalises their captures and destroys the library.

Signal handlers only set flags (:mod:`agent.recorder.signals`: a lock taken in a handler
deadlocked a draining worker), and pjsua's threads never get a signal: SIGTERM/SIGINT
ask for an orderly stop (new INVITEs get 503), a second one exits at once (what was
recorded is recovered on restart); SIGHUP reloads the directory and the log level (the
agent sends it when the directory file changes, and passes its own SIGHUP on). When
the agent dies (even by SIGKILL) the kernel sends SIGUSR2, once per exiting agent
thread: the worker drains its calls as for a stop, however often it comes, and exits;
a restarted agent's worker for the same slot waits for it (see
:mod:`agent.recorder.ownership`).

Start-up failures are written to the readiness pipe (``failed <code> <reason>``) for
the agent to report; a SIP port held by another process exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType

from agent import logs
from agent.capture import recover_active
from agent.config import AgentConfig, ConfigError, load_agent_config
from agent.directory import LiveDirectory
from agent.privacy import Protector
from agent.recorder.control.channel import ControlChannel, channel_name
from agent.recorder.ownership import WorkerSlot
from agent.recorder.parties import PartyRules
from agent.recorder.signals import Flag, main_thread_only
from agent.recorder.sip import SipEngine
from agent.recorder.zygote import process_name

log = logs.get_logger("agent.recorder.worker")  # also when run as __main__

POLL_MS = 500  # libHandleEvents returns at once on any SIP event; this bounds idle wake-ups
PR_SET_PDEATHSIG = 1
PARENT_GONE = signal.SIGUSR2
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
HANGUP_WAIT_S = 3.0
RECOVERY_RETRY_S = 30.0  # captures that could not be recovered (a full disk) are retried
# A predecessor still holding the slot this long after [sip] drain is hung: its own
# deadline is drain + hang-up (3 s) + close (~6 s).
PREDECESSOR_MARGIN_S = 20.0
EXIT_PORT_IN_USE = 2


class PortInUse(RuntimeError):
    """The worker's SIP port is held by another process."""


class StartCancelled(Exception):
    """A stop was asked while the worker waited for its slot."""


def _stop_with_parent() -> None:
    """Ask the kernel for PARENT_GONE when the agent dies (even by SIGKILL): the worker
    then drains its calls and exits, freeing the SIP port its successor needs. Not
    SIGTERM: the kernel sends it once per exiting thread of the agent, and a second
    SIGTERM means "exit at once"."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, PARENT_GONE)
    except (OSError, AttributeError):
        log.warning("pdeathsig_unavailable")
        return
    if os.getppid() == 1:  # the agent died before we asked
        os.kill(os.getpid(), PARENT_GONE)


def check_port_free(address: str, port: int) -> None:
    """Raise PortInUse if another process holds the UDP port (pjsua's error says less)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(f"SIP port {address}:{port}/udp is in use by another process") from None


def _not_dumpable(index: int) -> None:
    """No core dump, and no ptrace or ``/proc/<pid>/mem`` for other processes of our
    user: a worker holds raw INVITEs (full numbers) in memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    log.info("core_dumps_off", worker=index, dumpable=libc.prctl(PR_GET_DUMPABLE))


def _slot_worker(pid: int, index: int) -> bool:
    """``pid`` is a worker of slot ``index``: started as ``-m agent.recorder.worker
    --index <index>``, or forked by the zygote (then named for its slot)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    flag = [b"--index", str(index).encode()]
    started = b"agent.recorder.worker" in args and any(
        args[i : i + 2] == flag for i in range(len(args))
    )
    return started or (b"agent.recorder.zygote" in args and name == process_name(index))


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
        self.stop = Flag()  # set by signal handlers: never a threading.Event (a lock)
        self.reload = Flag()
        self.orphaned = False  # the agent died: drain, then exit
        self._signals = 0
        self._engine: SipEngine | None = None
        self._directory: LiveDirectory | None = None
        self._slot: WorkerSlot | None = None
        self.active_dir = cfg.captures_dir / "active" / f"w{index}"
        self._next_recovery: float | None = None  # set while captures wait for recovery
        self._told_waiting = False  # for the slot
        self._evicted = False  # a hung predecessor was killed
        self._control: ControlChannel | None = None  # the agent's control API's way in

    # ------------------------------------------------------------ lifecycle

    def startup(self) -> None:
        cfg = self.cfg
        _not_dumpable(self.index)
        _stop_with_parent()
        self._slot = WorkerSlot.acquire(self.active_dir, self._waiting, self.stop.is_set)
        if self._slot is None:
            raise StartCancelled
        check_port_free(*cfg.sip.worker_sip(self.index))
        self._recover()
        # The agent watches the file and sends SIGHUP on a change: one watcher per
        # host, not one per worker (inotify instances are limited to 128 per user).
        directory = LiveDirectory(cfg.directory_file)
        protector = Protector.load(cfg.privacy.default_region, cfg.privacy.seal_public_key_file)
        rules = PartyRules.build(protector, cfg.service_numbers)
        self._directory = directory
        self._engine = SipEngine(cfg, self.index, directory, rules)
        with main_thread_only():  # pjsua's threads: no signal cuts their waits short
            self._engine.start()
        try:
            self._control = ControlChannel(channel_name(cfg.captures_dir, self.index))
        except OSError as exc:  # calls are recorded all the same; control answers 503
            log.error("control_channel_failed", worker=self.index, error=str(exc))
        self._signal_ready()

    def _waiting(self, pid: int | None, waited_s: float) -> None:
        """The slot is held: say so once; past the predecessor's own deadline (drain,
        hang-up, close) it is hung, and is killed if it is this slot's worker."""
        if not self._told_waiting:
            self._told_waiting = True
            log.warning(
                "worker_waiting", worker=self.index, predecessor_pid=pid,
                reason="the previous worker of this slot still drains its calls",
            )  # fmt: skip
        if pid is None or self._evicted or waited_s < self.cfg.sip.drain_s + PREDECESSOR_MARGIN_S:
            return
        self._evicted = True
        if not _slot_worker(pid, self.index):
            log.error("worker_slot_held", worker=self.index, pid=pid, action="left_alone")
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        log.error(
            "worker_predecessor_killed", worker=self.index, pid=pid, waited_s=round(waited_s, 1),
            reason="still running past its drain deadline",
        )  # fmt: skip

    def _recover(self) -> None:
        """Recover what a dead predecessor left; what fails (a full disk) is retried."""
        skip = self._engine.capture_names() if self._engine is not None else set()
        ready_dir = self.cfg.captures_dir / "ready"
        result = recover_active(self.active_dir, ready_dir, self.cfg.quarantine_dir, skip)
        for recording_id in result.recovered:
            log.warning(
                "capture_recovered", recording_id=recording_id, worker=self.index,
                flags="incomplete",
            )  # fmt: skip
        for name, reason in result.quarantined:
            log.error("capture_quarantined", entry=name, worker=self.index, reason=reason)
        for name in result.in_use:
            log.warning("capture_in_use", entry=name, worker=self.index, action="left_alone")
        for name, error in result.failed:
            log.error(
                "capture_recovery_failed", entry=name, worker=self.index, error=error,
                retry_in_s=RECOVERY_RETRY_S,
            )  # fmt: skip
        failed = bool(result.failed)
        self._next_recovery = time.monotonic() + RECOVERY_RETRY_S if failed else None

    def fail_ready(self, code: int, reason: str) -> None:
        """Tell a parent waiting on the readiness pipe why the start failed."""
        if self.ready_fd is not None:
            line = f"failed {code} {' '.join(reason.split())[:400]}\n"
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, line.encode(errors="replace"))
        self.close_ready_fd()

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
            self._turn(engine)
            if self.reload.is_set():
                self.reload.clear()
                self._reload()
            if self._next_recovery is not None and time.monotonic() >= self._next_recovery:
                self._recover()
        if self.orphaned:
            log.warning(
                "agent_gone", worker=self.index, calls=engine.active_calls,
                action="drain_then_exit", drain_s=self.cfg.sip.drain_s,
            )  # fmt: skip

    def _turn(self, engine: SipEngine) -> None:
        """One turn of the loop: pjsua2's events, then the control commands waiting."""
        engine.poll(POLL_MS)
        if self._control is not None:
            self._control.serve(engine.control)

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
            self._turn(engine)  # a call draining can still be paused or discarded
        if engine.active_calls:
            log.warning("worker_hangup", worker=self.index, calls=engine.active_calls)
            engine.hangup_all()
            deadline = time.monotonic() + HANGUP_WAIT_S
            while engine.active_calls and time.monotonic() < deadline:
                engine.poll(POLL_MS)
        if self._control is not None:
            self._control.close()
            self._control = None
        engine.close()
        self._engine = None
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def _sip(self) -> SipEngine:
        if self._engine is None:
            raise RuntimeError("Worker.startup() has not run")
        return self._engine

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(PARENT_GONE, self._on_parent_gone)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(1)
        self.stop.set()

    def _on_parent_gone(self, signum: int, frame: FrameType | None) -> None:
        """The agent died: drain as for a stop; repeats change nothing."""
        self.orphaned = True
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
    except StartCancelled:
        log.info("worker_stopped", worker=index, reason="stopped while waiting for its slot")
        worker.close_ready_fd()
        return 0
    except PortInUse as exc:
        log.error("worker_start_failed", worker=index, reason=str(exc))
        worker.fail_ready(EXIT_PORT_IN_USE, str(exc))
        return EXIT_PORT_IN_USE
    except Exception as exc:
        log.exception("worker_start_failed", worker=index)
        worker.fail_ready(1, f"{type(exc).__name__}: {exc}")
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
