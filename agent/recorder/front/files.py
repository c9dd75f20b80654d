"""The SIP front's files: what the agent renders from its own ``[sip]`` config (one
source of truth) for Kamailio 5.6 with the dispatcher module in front of the agent's
pjsua2 workers; running Kamailio is :mod:`agent.recorder.front.kamailio`.

The agent renders them into ``<data_dir>/front/``: ``kamailio.cfg`` and
``dispatcher.list``, the directory 0750, the files 0640, each replaced by
write-and-rename (the directory is bind-mounted into callrec-front.service, so it is
never replaced itself).

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
  each BYE stamped with the time the front received it (``X-Callrec-Received``, any
  such header from outside removed first): the recording ends then, not when a busy
  worker reads it;
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

import os
from dataclasses import dataclass
from pathlib import Path

from agent import logs
from agent.capture import NO_SPACE
from agent.config import WORKER_MAX_CALLS, AgentConfig, SipConfig
from agent.recorder.front import edge
from agent.recorder.front.template import TEMPLATE, TLS_TEMPLATE

log = logs.get_logger(__name__)

CONFIG_FILE = "kamailio.cfg"
TLS_FILE = "tls.cfg"
LIST_FILE = "dispatcher.list"
PRODUCTION_RUNTIME_DIR = Path("/run/callrec-front")  # RuntimeDirectory= of the unit
DISPATCHER_SET = 1
TCP_READ_BUFFER_MB = 4  # per TCP connection: a message up to this size gets an answer
TCP_MAX_CONNECTIONS = 64  # SRCs keep a few connections each
FR_TIMER_MS = 1000  # no 100 Trying from a worker within 1 s: it is dead (pjsua answers at once)
FR_INV_TIMER_MS = 5000  # 100 Trying but no final answer: a hung worker
BYE_FR_TIMER_MS = 5000  # a BYE waits this long for a busy worker's 200 (not fr_timer)
CALL_REF = "$(ci{s.sha256}{s.substr,0,16})"  # agent.recorder.session.call_ref, in Kamailio
CTL_SOCKET = "kamailio_ctl"
MAX_SOCKET_PATH = 100  # Kamailio refuses a unix socket name over 104 bytes
METADATA_EXPIRE_S = 30  # metadata kept aside that no worker fetched is dropped


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
        "BYE_FR_MS": str(BYE_FR_TIMER_MS),
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
        "RECEIVED_HDR": edge.RECEIVED_HEADER,
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
