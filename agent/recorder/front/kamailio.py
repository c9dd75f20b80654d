"""The SIP front: Kamailio 5.6 (Debian) with the dispatcher module in front of the
agent's pjsua2 workers (each holds at most four calls, see DESIGN.md).

Its files (``kamailio.cfg``, ``dispatcher.list``), how it routes and how to point a
PBX/SBC at it: :mod:`agent.recorder.front.files`. This module runs it: in production
systemd runs Kamailio (callrec-front.service); with ``run_front = true`` the agent
runs it itself (:class:`FrontProcess`: tests, development), restarts it if it dies and
relays its log lines into ours; ``kamcmd`` asks it for its destinations.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent import logs, metrics
from agent.config import AgentConfig
from agent.recorder.front.files import (
    TCP_MAX_CONNECTIONS,
    TCP_READ_BUFFER_MB,
    FrontFiles,
    write_front_files,
)
from agent.recorder.front.logfilter import emit, kamailio_record

log = logs.get_logger(__name__)

SHM_MB, PKG_MB = 64 + TCP_MAX_CONNECTIONS * TCP_READ_BUFFER_MB, 8  # as in callrec-front.service
READY_TIMEOUT_S = 15.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


# ---------------------------------------------------------------- kamcmd


@dataclass(frozen=True)
class Destination:
    duid: str
    uri: str
    flags: str  # "AP" active (probing), "IP" inactive (probing), "DX" disabled…
    load: int  # calls the front counts on this worker

    @property
    def active(self) -> bool:
        return self.flags.startswith("A")


def kamcmd(files: FrontFiles, *command: str, timeout: float = 5.0) -> str:
    proc = subprocess.run(
        ["kamcmd", "-s", files.ctl, *command],
        cwd=files.runtime_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kamcmd {' '.join(command)}: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def parse_dispatcher_list(text: str) -> list[Destination]:
    """``kamcmd dispatcher.list`` → the destinations, in the file's worker order."""
    found: list[Destination] = []
    for block in text.split("DEST:")[1:]:
        fields = dict(re.findall(r"^\s*(URI|FLAGS|DUID|DLGLOAD):\s*(\S+)", block, re.M))
        found.append(
            Destination(
                fields.get("DUID", ""),
                fields.get("URI", ""),
                fields.get("FLAGS", ""),
                int(fields.get("DLGLOAD", "0")),
            )
        )
    return sorted(found, key=lambda d: int(d.duid[1:]) if d.duid[1:].isdigit() else 0)


def destinations(files: FrontFiles) -> list[Destination]:
    return parse_dispatcher_list(kamcmd(files, "dispatcher.list"))


# ---------------------------------------------------------------- the process


class FrontProcess:
    """Kamailio run by the agent (``run_front = true``): started after the workers,
    stopped after them (BYEs of calls still draining pass through it), restarted if
    it dies. Its stderr is relayed line by line into our log, sanitised; refusals
    (``event=front_refused``) and failovers are counted."""

    def __init__(self, cfg: AgentConfig, files: FrontFiles) -> None:
        self.cfg = cfg
        self.files = files
        self.refused = 0
        self.failovers = 0
        self.restarts = 0
        self._process: subprocess.Popen[str] | None = None
        self._relay: threading.Thread | None = None
        self._stopping = False
        self._next_start = 0.0
        self._started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        return [
            str(self.cfg.sip.kamailio),
            "-DD",
            "-E",
            "-Y",
            str(self.files.runtime_dir),
            "-w",
            str(self.files.runtime_dir),
            "-m",
            str(SHM_MB),
            "-M",
            str(PKG_MB),
            "-f",
            str(self.files.config),
        ]

    def start(self, wait: bool = True) -> None:
        self.files.runtime_dir.mkdir(parents=True, exist_ok=True)
        kill_stale_front(self.files)
        self._stopping = False
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: no child outlives it
        )
        self._started_at = time.monotonic()
        _write_pid(self.files.pid_file, self._process.pid)
        self._relay = threading.Thread(
            target=self._relay_lines, args=(self._process.stdout,), name="front-log", daemon=True
        )
        self._relay.start()
        if wait:
            self._wait_ready()
        log.info(
            "front_started",
            pid=self._process.pid,
            sip=f"{self.cfg.sip.listen}:{self.cfg.sip.port}",
            workers=self.cfg.sip.workers,
        )

    def _wait_ready(self) -> None:
        """Ready once its control socket answers (children forked, lists loaded)."""
        assert self._process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"kamailio exited with {self._process.returncode} at start "
                    f"(config {self.files.config}; its log lines are above)"
                )
            try:
                kamcmd(self.files, "core.uptime", timeout=2.0)
                return
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(0.1)
        raise RuntimeError(f"kamailio not ready in {READY_TIMEOUT_S:.0f}s")

    def supervise(self) -> None:
        """Restart Kamailio if it died (with backoff); called from the agent's loop."""
        process = self._process
        if process is None:
            if time.monotonic() >= self._next_start:
                try:
                    self.start(wait=False)
                except OSError as exc:
                    log.error("front_start_failed", error=str(exc))
                    self._schedule_restart()
            return
        if process.poll() is None or self._stopping:
            return
        log.error(
            "front_died",
            pid=process.pid,
            exit_code=process.returncode,
            restart_in_s=round(self._backoff()),
        )
        _kill_group(process.pid)  # its children would keep the SIP port
        self._process = None
        self._schedule_restart()

    def _backoff(self) -> float:
        return RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]

    def _schedule_restart(self) -> None:
        if time.monotonic() - self._started_at > 60.0:
            self.restarts = 0  # it ran well for a while: start the backoff afresh
        self._next_start = time.monotonic() + self._backoff()
        self.restarts += 1

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        self._stopping = True
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("front_kill", reason="stop_timeout", pid=process.pid)
                process.kill()
                process.wait(5)
        _kill_group(process.pid)
        self.files.pid_file.unlink(missing_ok=True)
        if self._relay is not None:
            self._relay.join(2.0)
        log.info(
            "front_stopped",
            exit_code=process.returncode,
            refused=self.refused,
            failovers=self.failovers,
        )

    def kill(self) -> None:
        """At a forced exit: no orphan may keep the SIP port."""
        if self._process is not None and self._process.poll() is None:
            self._stopping = True
            self._process.kill()
            _kill_group(self._process.pid)

    def _relay_lines(self, stream: IO[str] | None) -> None:
        if stream is None:
            return
        with stream:  # closed at EOF: Kamailio exited
            for raw in stream:
                self._relay_line(raw.rstrip("\n"))

    def _relay_line(self, raw: str) -> None:
        record = kamailio_record(raw)
        if record is None:
            return  # a dumped message's content (see agent.recorder.front.logfilter)
        level, text, fields = record
        if self._stopping:
            level = logging.DEBUG  # its processes exiting at shutdown log ALERTs
        if fields is not None and fields.get("event") == "front_refused":
            self.refused += 1
            fields["refused_total"] = self.refused
            metrics.FRONT_REFUSED.labels(str(fields.get("status", 503))).inc()
        elif fields is not None and fields.get("event") == "front_failover":
            self.failovers += 1
        emit(log, level, text, fields)


def _write_pid(path: Path, pid: int) -> None:
    """Best effort: without it (a full disk) only a stale front's clean-up is lost."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(f"{pid}\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("front_pid_file_failed", path=path, error=exc.strerror)


def _group_members(pgid: int, marker: str) -> list[int]:
    """Processes of group ``pgid`` whose command line holds ``marker`` (a pid file can
    outlive its processes, and pids are reused: never kill a stranger)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state ppid pgrp …
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid and marker in cmdline:
            found.append(int(entry.name))
    return found


def stale_front_alive(files: FrontFiles) -> bool:
    """Whether the Kamailio of a previous run of the agent still runs."""
    try:
        pgid = int(files.pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    return bool(_group_members(pgid, str(files.config)))


def kill_stale_front(files: FrontFiles, timeout: float = 5.0) -> int:
    """Kill a Kamailio a previous run of the agent left (it was SIGKILLed: its front
    would hold the SIP port and make this start fail). Returns how many processes."""
    try:
        pgid = int(files.pid_file.read_text().strip())
    except (OSError, ValueError):
        return 0
    members = _group_members(pgid, str(files.config))
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while members and _group_members(pgid, str(files.config)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if members:
        log.warning(
            "front_stale_killed", pid=pgid, processes=len(members), reason="left by a previous run"
        )
    files.pid_file.unlink(missing_ok=True)
    return len(members)


def _kill_group(pid: int) -> None:
    """Kill what is left of Kamailio's process group (its forked children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# write_front_files is re-exported: agent.recorder.daemon imports it from here.
__all__ = [
    "Destination",
    "FrontProcess",
    "destinations",
    "kamcmd",
    "kill_stale_front",
    "parse_dispatcher_list",
    "stale_front_alive",
    "write_front_files",
]
