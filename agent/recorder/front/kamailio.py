"""The SIP front: Kamailio 5.6 (Debian) with the dispatcher module in front of the
agent's pjsua2 workers (each holds at most four calls, see DESIGN.md).

The agent renders the front's files from its own ``[sip]`` config (one source of
truth) into ``<data_dir>/front/``: ``kamailio.cfg`` and ``dispatcher.list``, the
directory 0750, the files 0640, each replaced by write-and-rename (the directory is
bind-mounted into callrec-front.service, so it is never replaced itself). In
production systemd runs Kamailio (callrec-front.service); with ``run_front = true``
the agent runs it itself (tests, development) and relays its log lines into ours.

Routing (measured facts of DESIGN.md built in):

- dispatcher algorithm 10 (call load) without a database: ``ds_hash_size > 0``, a
  ``duid`` and ``maxload=4`` per worker, ``ds_load_update()`` on the INVITE's 2xx
  and on BYE, so the front ``record_route()``s and sees the BYE. A call that ends
  before it was answered (CANCEL, every worker refused) is off-loaded in the failure
  route with ``ds_load_unset()`` — not on the CANCEL itself, which can lose the race
  with the worker's 200 and would then drop the load of a live call;
- failover on 486 (full: two front processes may pick the same nearly-full worker),
  503 (the worker is draining), 480 (it is closing: no account any more), other 5xx
  and timeout (dead: marked inactive at once, before the next probe notices).
  ``ds_load_unset()`` runs *before* the destination list runs empty, or a refused
  call would leak a slot until ``ds_hash_initexpire``;
- no worker can take the call: the SRC gets 503 (and may try another recorder);
- OPTIONS probing (pjsua answers OPTIONS itself) every ``probe_interval``; the
  front answers OPTIONS sent to itself (SRC keep-alives) with 200;
- log lines name the call only by ``call_ref`` (the sha256 prefix of the Call-ID the
  workers log too) and the worker by its ``duid``: never a From/To/R-URI user part.
  Kamailio's own parse errors (which print whole messages) go through
  :mod:`agent.recorder.front.logfilter`, which drops message content and redacts numbers;
- the SIP edge (:mod:`agent.recorder.front.edge`): only listed recording clients
  (``[sip] allowed_clients``, 403 otherwise), requests up to ``[sip] max_message``
  (513 otherwise), the metadata part kept aside in memory for the worker to fetch;
  optionally SIP over TLS with client certificates (``[sip] tls_port``).

Pointing a PBX/SBC at the front: configure it as a SIPREC recording server (SRS) at
``sip:<[sip] listen>:<[sip] port>`` over UDP or TCP (e.g. Cisco CUBE ``media
profile recorder`` with that address as the dial-peer target, an Oracle SBC
``session-recording-server`` realm, FreeSWITCH/Asterisk forking a plain INVITE with
the ``X-Callrec-*`` headers). Media goes straight to the worker's RTP address in the
200's SDP (``[sip] listen``), so that address must be reachable from the SBC's media
interface and the RTP ranges (``rtp_port_start`` + workers * ``rtp_port_count``)
open in its firewall; the workers' SIP ports stay on loopback.
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
from agent.capture import NO_SPACE
from agent.config import WORKER_MAX_CALLS, AgentConfig, SipConfig
from agent.recorder.front import edge
from agent.recorder.front.logfilter import emit, kamailio_record
from agent.recorder.front.template import TEMPLATE, TLS_TEMPLATE

log = logs.get_logger(__name__)

CONFIG_FILE = "kamailio.cfg"
TLS_FILE = "tls.cfg"
LIST_FILE = "dispatcher.list"
PRODUCTION_RUNTIME_DIR = Path("/run/callrec-front")  # RuntimeDirectory= of the unit
DISPATCHER_SET = 1
TCP_READ_BUFFER_MB = 4  # per TCP connection: a message up to this size gets an answer
TCP_MAX_CONNECTIONS = 64  # SRCs keep a few connections each
SHM_MB, PKG_MB = 64 + TCP_MAX_CONNECTIONS * TCP_READ_BUFFER_MB, 8  # as in callrec-front.service
FR_TIMER_MS = 1000  # no 100 Trying from a worker within 1 s: it is dead (pjsua answers at once)
FR_INV_TIMER_MS = 5000  # 100 Trying but no final answer: a hung worker
CALL_REF = "$(ci{s.sha256}{s.substr,0,16})"  # agent.recorder.session.call_ref, in Kamailio
READY_TIMEOUT_S = 15.0
CTL_SOCKET = "kamailio_ctl"
MAX_SOCKET_PATH = 100  # Kamailio refuses a unix socket name over 104 bytes
METADATA_EXPIRE_S = 30  # metadata kept aside that no worker fetched is dropped
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class FrontFiles:
    directory: Path
    config: Path
    dispatcher_list: Path
    runtime_dir: Path

    @property
    def pid_file(self) -> Path:
        """The Kamailio the agent runs (``run_front``): its pid, also its group's."""
        return self.runtime_dir / "front.pid"

    @property
    def ctl(self) -> str:
        """The ctl module's socket, for ``kamcmd -s`` (run in ``runtime_dir``).

        A unix socket's path holds at most ~104 bytes: under a deep ``data_dir`` the
        name is relative to ``runtime_dir``, which Kamailio is started in (``-w``)."""
        path = self.runtime_dir / CTL_SOCKET
        return f"unix:{path}" if len(str(path)) <= MAX_SOCKET_PATH else f"unix:{CTL_SOCKET}"


def front_files(cfg: AgentConfig) -> FrontFiles:
    directory = cfg.data_dir / "front"
    runtime = directory / "run" if cfg.sip.run_front else PRODUCTION_RUNTIME_DIR
    return FrontFiles(directory, directory / CONFIG_FILE, directory / LIST_FILE, runtime)


def render_dispatcher_list(sip: SipConfig) -> str:
    """One destination per worker. Priorities fall with the index, so that among
    equally loaded workers the first is chosen (Kamailio sorts by priority)."""
    lines = ["# setid destination flags priority attrs — rendered by callrec; do not edit"]
    for index in range(sip.workers):
        host, port = sip.worker_sip(index)
        attrs = f"duid=w{index};maxload={WORKER_MAX_CALLS}"
        lines.append(
            f"{DISPATCHER_SET} sip:{host}:{port};transport=udp 0 {sip.workers - index} {attrs}"
        )
    return "\n".join(lines) + "\n"


def render_config(cfg: AgentConfig, files: FrontFiles) -> str:
    """Kamailio's configuration for this agent's worker pool."""
    sip = cfg.sip
    tls = sip.tls_port is not None
    values = {
        "REFUSED": "event=front_refused call_ref=%REF% status=",
        "LISTEN": sip.listen,
        "PORT": str(sip.port),
        "CTL": files.ctl,
        "LIST": str(files.dispatcher_list),
        "SET": str(DISPATCHER_SET),
        "PING_S": str(max(1, round(sip.probe_interval_s))),
        "EXPIRE_S": str(int(sip.max_call_s) + 60),
        "FR_MS": str(FR_TIMER_MS),
        "FR_INV_MS": str(FR_INV_TIMER_MS),
        "REF": CALL_REF,
        "W": "$xavp(_dsdst_=>dstid)",
        "NEXT": "$xavp(_dsdst_[1]=>dstid)",
        "ST": "$var(status)",
        "HTTP_LISTEN": edge.front_address(sip),
        "HTTP_PORT": str(sip.front_http_port),
        "ALLOWED": allowed_condition(sip),
        "WORKERS": sip.worker_listen,
        "MAX_MSG": str(sip.max_message_bytes),
        "TCP_BUF": str(TCP_READ_BUFFER_MB * 1024 * 1024),
        "TCP_MAX": str(TCP_MAX_CONNECTIONS),
        "PV_BUF": str(2 * sip.max_message_bytes),
        "META_EXPIRE_S": str(METADATA_EXPIRE_S),
        "SOURCE_HDR": edge.SOURCE_HEADER,
        "META_HDR": edge.METADATA_HEADER,
        "META_PATH": edge.METADATA_PATH,
        "META_PATH_LEN": str(len(edge.METADATA_PATH)),
        "TLS_LISTEN": f"enable_tls=yes\nlisten=tls:{sip.listen}:{sip.tls_port}" if tls else "",
        "TLS_MODULE": (
            f'loadmodule "tls.so"\nmodparam("tls", "config", "{files.directory / TLS_FILE}")'
            if tls
            else ""
        ),
    }
    text = TEMPLATE
    for key, value in values.items():
        text = text.replace("%" + key + "%", value)
    return text


def render_tls(sip: SipConfig) -> str:
    """The tls module's server profile: client certificates required and verified."""
    values = {"CERT": sip.tls_cert_file, "KEY": sip.tls_key_file, "CA": sip.tls_ca_file}
    text = TLS_TEMPLATE
    for key, value in values.items():
        text = text.replace("%" + key + "%", str(value))
    return text


def allowed_condition(sip: SipConfig) -> str:
    """The allow-list as a Kamailio condition on the request's source address."""
    networks = (*sip.allowed_clients, *(c.address for c in sip.clients))
    return "(" + " || ".join(f"src_ip == {net}" for net in networks) + ")"


def _write(path: Path, text: str) -> None:
    """Write-and-rename, 0640 (the front's user reads it through group callrec). On a
    full disk an unchanged file is kept: the agent can restart there."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in NO_SPACE or _read(path) != text:
            raise
        return
    os.chmod(tmp, 0o640)
    tmp.replace(path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def write_front_files(cfg: AgentConfig) -> FrontFiles:
    """Render the front's config and dispatcher list into ``<data_dir>/front``."""
    files = front_files(cfg)
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o750)  # noqa: S103 - the front's user reads it (group)
    _write(files.dispatcher_list, render_dispatcher_list(cfg.sip))
    if cfg.sip.tls_port is not None:
        _write(files.directory / TLS_FILE, render_tls(cfg.sip))
    _write(files.config, render_config(cfg, files))
    log.info(
        "front_rendered",
        config=files.config,
        workers=cfg.sip.workers,
        sip=f"{cfg.sip.listen}:{cfg.sip.port}",
        probe_s=max(1, round(cfg.sip.probe_interval_s)),
    )
    return files


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
