"""``[sip]`` of the agent's config: where the agent answers SIP and RTP, its workers'
ports, the Kamailio front, the recording clients allowed and what they send."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.parsing import _REQUIRED, _Section

WORKER_MAX_CALLS = 4  # PJSUA_MAX_CALLS of the pjsua2 wheel: a fifth INVITE gets 486
LOOPBACK_CLIENTS = ("127.0.0.0/8", "::1/128")
MAX_SIP_MESSAGE = 65536  # the front refuses larger requests with 513
FRAME_MS = (20, 40, 60)  # whole RTP packets of 20 ms per bridge frame


@dataclass(frozen=True)
class SipClient:
    """``[[sip.clients]]``: where one recording client (an SRC at ``address``, an
    address or network) names what its metadata may leave out. ``service_header``: a
    header whose URI gives the service line (``P-Called-Party-ID``, ``Diversion``…);
    ``service_number``: a fixed service line for every call of this client;
    ``employee_header``: a header whose URI names the employee (SIPREC calls too)."""

    address: str
    service_header: str | None = None
    service_number: str | None = None
    employee_header: str | None = None

    def matches(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in ipaddress.ip_network(self.address)
        except ValueError:
            return False


@dataclass(frozen=True)
class SipConfig:
    """``[sip]``. The public SIP address is ``listen:port``: the Kamailio front's when
    ``front`` is on (workers then listen on ``worker_listen:worker_port + i``), else
    worker ``i``'s own (``port + i``). Workers always bind RTP on ``listen`` (media
    bypasses the front), worker ``i`` on ``rtp_port_start + i * rtp_port_count``."""

    listen: str = "127.0.0.1"
    port: int = 5070
    rtp_port_start: int = 40000
    rtp_port_count: int = 200
    workers: int = 1
    rtp_timeout_s: float = 30.0
    max_call_s: float = 4 * 3600.0
    drain_s: float = 60.0  # at shutdown, calls in progress may run this long, then BYE
    # "fork": workers are forked from one pre-imported process, whose heap they share
    # (agent.recorder.zygote); "exec": each worker starts and imports its own Python.
    worker_start: str = "fork"
    # pjmedia's own thread reads RTP (polling every 10 ms, calls or not); false: the
    # worker's one pjsua thread does, sleeping until a packet comes (idle: 4x cheaper).
    media_thread: bool = True
    # The conference bridge's frame (pjsua's audioFramePtime): its clock ticks, and each
    # leg's WAV gets a frame, every frame_ms. RTP packets keep their own ptime.
    frame_ms: int = 40
    # For plain (non-SIPREC) INVITEs of a forking PBX: headers naming the parties.
    customer_header: str = "X-Callrec-Customer"
    employee_header: str = "X-Callrec-Employee"
    service_header: str = "X-Callrec-Service"
    direction_header: str = "X-Callrec-Direction"
    # The SIP front (Kamailio dispatcher, agent.recorder.front.files and .kamailio).
    front: bool = False
    run_front: bool = False  # the agent runs Kamailio itself (tests, development)
    worker_listen: str = "127.0.0.1"
    worker_port: int = 5071
    kamailio: Path = Path("/usr/sbin/kamailio")
    probe_interval_s: float = 2.0
    # The SIP edge: who may create a recording, and how.
    allowed_clients: tuple[str, ...] = LOOPBACK_CLIENTS  # networks, normalised
    plain: bool = False  # accept plain (non-SIPREC) INVITEs with X-Callrec-* headers
    clients: tuple[SipClient, ...] = ()
    # The front keeps INVITEs' metadata aside; workers fetch it here (loopback HTTP).
    front_http_port: int = 5069
    max_message_bytes: int = MAX_SIP_MESSAGE
    # SIP over TLS at the front (Kamailio's tls module), client certificates required.
    tls_port: int | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # the CA that signs the recording clients' certificates

    def allows(self, ip: str) -> bool:
        """``ip`` is a listed recording client (``allowed_clients`` or a ``[[sip.clients]]``)."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        networks = (*self.allowed_clients, *(c.address for c in self.clients))
        return any(address in ipaddress.ip_network(net) for net in networks)

    def client(self, ip: str) -> SipClient | None:
        """The ``[[sip.clients]]`` entry for a source address (the first that matches)."""
        return next((c for c in self.clients if c.matches(ip)), None)

    def worker_sip(self, index: int) -> tuple[str, int]:
        """The SIP address worker ``index`` listens on."""
        if self.front:
            return self.worker_listen, self.worker_port + index
        return self.listen, self.port + index

    def worker_rtp(self, index: int) -> tuple[int, int]:
        """(first port, count) of worker ``index``'s RTP range on ``listen``."""
        return self.rtp_port_start + index * self.rtp_port_count, self.rtp_port_count


def _frame_ms(sip: _Section) -> int:
    value = sip.integer("frame_ms", 40, FRAME_MS[0], FRAME_MS[-1])
    if value not in FRAME_MS:
        raise sip._fail("frame_ms", value, "20, 40 or 60")
    return value


def _sip_config(sip: _Section) -> SipConfig:
    port = sip.integer("port", 5070, 1, 65535)
    cfg = SipConfig(
        listen=_ip(sip, "listen", "127.0.0.1"),
        port=port,
        rtp_port_start=sip.integer("rtp_port_start", 40000, 1024, 65000),
        # 4 calls x 2 streams x RTP+RTCP, and pjsua takes more pairs while answering:
        # 16 ports failed the 4th call (measured), so ask for a margin.
        rtp_port_count=sip.integer("rtp_port_count", 200, 32, 20000),
        workers=sip.integer("workers", 1, 1, 256),
        rtp_timeout_s=sip.seconds("rtp_timeout", "30s"),
        max_call_s=sip.seconds("max_call", "4h"),
        drain_s=sip.seconds("drain", "60s"),
        worker_start=sip.text("worker_start", "fork", choices=("fork", "exec")),
        media_thread=sip.boolean("media_thread", True),
        frame_ms=_frame_ms(sip),
        customer_header=sip.text("customer_header", SipConfig.customer_header),
        employee_header=sip.text("employee_header", SipConfig.employee_header),
        service_header=sip.text("service_header", SipConfig.service_header),
        direction_header=sip.text("direction_header", SipConfig.direction_header),
        front=sip.boolean("front", False),
        run_front=sip.boolean("run_front", False),
        worker_listen=_ip(sip, "worker_listen", "127.0.0.1"),
        worker_port=sip.integer("worker_port", min(port + 1, 65535), 1, 65535),
        kamailio=sip.path("kamailio", "/usr/sbin/kamailio"),
        probe_interval_s=sip.seconds("probe_interval", "2s"),
        allowed_clients=_networks(sip, "allowed_clients", list(LOOPBACK_CLIENTS)),
        plain=sip.boolean("plain", False),
        clients=_sip_clients(sip),
        front_http_port=sip.integer("front_http_port", max(port - 1, 1), 1, 65535),
        max_message_bytes=sip.integer("max_message", MAX_SIP_MESSAGE, 4096, MAX_SIP_MESSAGE),
        **_sip_tls(sip),
    )
    _check_sip_ports(sip, cfg)
    if cfg.tls_port is not None and not cfg.front:
        raise sip._fail("tls_port", cfg.tls_port, "front = true (the front terminates TLS)")
    return cfg


def _sip_tls(sip: _Section) -> dict[str, Any]:
    """``tls_port`` and the three files it needs (all or none)."""
    if "tls_port" not in sip.table:
        return {}
    return {
        "tls_port": sip.integer("tls_port", _REQUIRED, 1, 65535),
        "tls_cert_file": sip.path("tls_cert_file"),
        "tls_key_file": sip.path("tls_key_file"),
        "tls_ca_file": sip.path("tls_ca_file"),
    }


def _network(section: _Section, key: str, value: object) -> str:
    try:
        return str(ipaddress.ip_network(value if isinstance(value, str) else "", strict=True))
    except ValueError:
        raise section._fail(
            key, value, 'addresses or networks such as "10.1.2.0/24" or "192.0.2.7"'
        ) from None


def _networks(section: _Section, key: str, default: list[str]) -> tuple[str, ...]:
    values = section.strings(key, default)
    return tuple(_network(section, key, v) for v in values)


def _sip_clients(sip: _Section) -> tuple[SipClient, ...]:
    tables = sip._get("clients", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise sip._fail("clients", tables, "[[sip.clients]] tables")
    clients: list[SipClient] = []
    for index, table in enumerate(tables):
        c = _Section(f"sip.clients.{index}", table, sip.base)
        client = SipClient(
            address=_network(c, "address", c._get("address", _REQUIRED)),
            service_header=_header(c, "service_header"),
            service_number=c.text("service_number") if "service_number" in table else None,
            employee_header=_header(c, "employee_header"),
        )
        if client.service_header and client.service_number:
            raise c._fail("service_number", client.service_number, "no service_header beside it")
        c.check_unknown()
        clients.append(client)
    return tuple(clients)


def _header(section: _Section, key: str) -> str | None:
    if key not in section.table:
        return None
    value = section.text(key)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9!#$%&'*+.^_`|~-]{0,63}", value):
        raise section._fail(key, value, 'a SIP header name such as "P-Called-Party-ID"')
    return value


def _ip(section: _Section, key: str, default: str) -> str:
    value = section.text(key, default)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise section._fail(key, value, "an IP address") from None
    return value


def _check_sip_ports(sip: _Section, cfg: SipConfig) -> None:
    """Worker SIP ports and RTP ranges fit below 65536 and clash with nothing."""
    address = cfg.worker_sip(0)[0]
    last = cfg.worker_sip(cfg.workers - 1)[1]
    if last > 65535:
        key = "worker_port" if cfg.front else "port"
        raise sip._fail(key, last - cfg.workers + 1, f"room for {cfg.workers} worker ports")
    if cfg.front and address == cfg.listen and cfg.worker_port <= cfg.port <= last:
        raise sip._fail("worker_port", cfg.worker_port, f"ports that exclude port {cfg.port}")
    rtp_end = cfg.worker_rtp(cfg.workers - 1)[0] + cfg.rtp_port_count - 1
    if rtp_end > 65535:
        raise sip._fail(
            "rtp_port_start", cfg.rtp_port_start, f"room for {cfg.workers} RTP ranges below 65536"
        )
    sip_ports = range(cfg.worker_sip(0)[1], last + 1)
    if cfg.front and (cfg.front_http_port in sip_ports or cfg.front_http_port == cfg.port):
        raise sip._fail(
            "front_http_port", cfg.front_http_port, "a port apart from the SIP and worker ports"
        )
    if cfg.rtp_port_start <= max(sip_ports) and min(sip_ports) <= rtp_end:
        raise sip._fail("rtp_port_start", cfg.rtp_port_start, "RTP ranges apart from SIP ports")
