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
  Kamailio's own parse errors (which print whole messages) are at debug level.

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

from agent import logs
from agent.config import WORKER_MAX_CALLS, AgentConfig, SipConfig
from agent.recorder.front_cfg import TEMPLATE
from agent.redaction import redact_numbers

log = logs.get_logger(__name__)

CONFIG_FILE = "kamailio.cfg"
LIST_FILE = "dispatcher.list"
PRODUCTION_RUNTIME_DIR = Path("/run/callrec-front")  # RuntimeDirectory= of the unit
DISPATCHER_SET = 1
SHM_MB, PKG_MB = 64, 8  # as in callrec-front.service
FR_TIMER_MS = 1000  # no 100 Trying from a worker within 1 s: it is dead (pjsua answers at once)
FR_INV_TIMER_MS = 5000  # 100 Trying but no final answer: a hung worker
CALL_REF = "$(ci{s.sha256}{s.substr,0,16})"  # agent.recorder.session.call_ref, in Kamailio
READY_TIMEOUT_S = 15.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class FrontFiles:
    directory: Path
    config: Path
    dispatcher_list: Path
    runtime_dir: Path

    @property
    def ctl(self) -> str:
        """The ctl module's socket, for ``kamcmd -s``."""
        return f"unix:{self.runtime_dir / 'kamailio_ctl'}"


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
    values = {
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
    }
    text = TEMPLATE
    for key, value in values.items():
        text = text.replace("%" + key + "%", value)
    return text


def _write(path: Path, text: str) -> None:
    """Write-and-rename, 0640 (the front's user reads it through group callrec)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o640)
    tmp.replace(path)


def write_front_files(cfg: AgentConfig) -> FrontFiles:
    """Render the front's config and dispatcher list into ``<data_dir>/front``."""
    files = front_files(cfg)
    files.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(files.directory, 0o750)  # noqa: S103 - the front's user reads it (group)
    _write(files.dispatcher_list, render_dispatcher_list(cfg.sip))
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


_LINE = re.compile(r"^\s*\d+\((\d+)\)\s+([A-Z]+):\s+(.*)$")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "NOTICE": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "ALERT": logging.ERROR,
    "BUG": logging.CRITICAL,
}
_URI_USER = re.compile(r"\b(sips?:)[^@\s;>\"']+@", re.IGNORECASE)
_TEL_URI = re.compile(r"\btel:[^\s;>\"']+", re.IGNORECASE)


def sanitize(text: str) -> str:
    """A Kamailio log line without URI user parts or number-like digit runs."""
    text = _URI_USER.sub(r"\1<redacted>@", text)
    text = _TEL_URI.sub("tel:<redacted>", text)
    return redact_numbers(text)


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
            "-m",
            str(SHM_MB),
            "-M",
            str(PKG_MB),
            "-f",
            str(self.files.config),
        ]

    def start(self, wait: bool = True) -> None:
        self.files.runtime_dir.mkdir(parents=True, exist_ok=True)
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
        if not raw.strip():
            return
        match = _LINE.match(raw)
        level = _LEVELS.get(match.group(2), logging.INFO) if match else logging.INFO
        text = sanitize(match.group(3) if match else raw.strip())
        if self._stopping:
            level = logging.DEBUG  # its processes exiting at shutdown log ALERTs
        elif level == logging.INFO and not text.startswith("<script>:"):
            level = logging.DEBUG  # Kamailio's own start-up chatter
        script = text.startswith("<script>: ")  # an xlog line of our config: logfmt
        fields = logs.parse_logfmt(text.removeprefix("<script>: ")) if script else None
        event = fields.pop("event", None) if fields else None
        if fields is None or not isinstance(event, str) or not logs.is_event_name(event):
            log.log(level, "kamailio", msg=text)
            return
        if event == "front_refused":
            self.refused += 1
            fields["refused_total"] = self.refused
        elif event == "front_failover":
            self.failovers += 1
        log.log(level, event, **fields)


def _kill_group(pid: int) -> None:
    """Kill what is left of Kamailio's process group (its forked children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
