"""The SIP edge through the front for real: SIPp (the SRC) → Kamailio (rendered and
run by the agent) → pjsua2 workers → the store. Who may create a recording (the
allow-list, from another loopback address), INVITEs far larger than pjsip reads
(the front keeps the metadata aside), and what is refused as too large."""

from __future__ import annotations

import re
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.certs import issue_agent, issue_store, new_ca, write_pair
from agent.config import load_agent_config
from agent.recorder.sip import call_ref
from agent.testcall.sipp import (
    Midcall,
    Party,
    SiprecCall,
    free_port,
    metadata_xml,
    refused_scenario,
    run_sipp,
    siprec_scenario,
)
from tests.support.audio import Speech, carries, channel_rms
from tests.support.pool import (
    FULL_NUMBER,
    NATIONAL,
    SERVICE_AOR,
    Pool,
    employees,
    flags,
    place_and_store,
    running_pool,
    wait_log,
)

pytestmark = pytest.mark.sip

CUSTOMER_AOR = f"sip:+{FULL_NUMBER}@pbx.example;user=phone"
AINO = ("e1001", "Aino Virtanen")
# [[sip.clients]] entries (the address SIPp sends from) and the header each call carries.
SERVICE_SOURCES: dict[str, tuple[str, dict[str, str]]] = {
    "fixed": ("127.0.0.3", {"service_number": "+358 9 876 5432"}),
    "diversion": ("127.0.0.4", {"service_header": "Diversion"}),
    "history-info": ("127.0.0.5", {"service_header": "History-Info"}),
}
SERVICE_HEADERS = {
    "fixed": (),
    "diversion": (
        'Diversion: "Palvelu, Oy" <sip:+35898765432@pbx.example>;reason=unconditional, '
        "<sip:1001@pbx.example>;reason=no-answer",
    ),
    "history-info": (
        "History-Info: <sip:+35898765432@pbx.example>;index=1, "
        "<sip:1001@pbx.example?Reason=SIP%3Bcause%3D302>;index=1.1",
    ),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("edge")
    client = {
        "address": "127.0.0.1",
        "service_header": "P-Called-Party-ID",
        "employee_header": "X-Agent",
    }
    # Clients whose metadata names no service line, each filled from another source.
    silent = [{"address": ip, **source} for ip, source in SERVICE_SOURCES.values()]
    metrics: dict[str, object] = {"metrics": f"127.0.0.1:{free_port()}"}
    with running_pool(
        root, workers=2, agent_section=metrics, allowed_clients=["127.0.0.1"],
        clients=[client, *silent],
    ) as running:  # fmt: skip
        yield running


@pytest.fixture
def speech(pool: Pool) -> Speech:
    return pool.speech


@pytest.fixture
def idle(pool: Pool) -> Pool:
    pool.wait_idle()
    return pool


def _not_stored(pool: Pool, call_id: str | None, wait_s: float = 3.0) -> None:
    assert call_id is not None
    time.sleep(wait_s)
    assert call_ref(call_id) not in pool.stored_refs()
    lines = [line for line in pool.text().splitlines() if call_ref(call_id) in line]
    assert not [line for line in lines if "call_answered" in line], lines


def test_a_client_not_listed_is_refused_at_the_front(idle: Pool, tmp_path: Path) -> None:
    pool = idle
    call = pool.call(customer=CUSTOMER_AOR)
    scenario = refused_scenario(call, 403)
    result = pool.run(scenario, "stranger", timeout_s=15, local_ip="127.0.0.2", calls=3)
    assert result.ok, result.errors or result.stdout
    assert [c.refused_status for c in result.calls.values()] == [403, 403, 403]
    wait_log(pool, "status=403 reason=client_not_allowed source=127.0.0.2 method=INVITE")
    for call_id in result.calls:
        _not_stored(pool, call_id, wait_s=1.0)
    refusals = [line for line in pool.text().splitlines() if "source=127.0.0.2" in line]
    assert len(refusals) == 1, refusals  # one line per source a minute; no worker saw any
    # Around the front, straight to a worker: the worker takes INVITEs from the front only.
    worker = load_agent_config(pool.root / "agent.toml").sip.worker_sip(0)
    direct = run_sipp(scenario, worker, tmp_path / "direct", timeout_s=15)
    assert direct.ok and direct.first is not None and direct.first.refused_status == 403
    wait_log(pool, "status=403 reason=not_from_front source=127.0.0.1")
    _not_stored(pool, direct.call_id, wait_s=0.5)
    assert _refused_403(pool) >= 2  # the front's refusal and the worker's
    assert FULL_NUMBER not in pool.text() and NATIONAL not in pool.text()


def _refused_403(pool: Pool) -> float:
    listen = load_agent_config(pool.root / "agent.toml").metrics_listen
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    # The front's refusals (the agent's own family) and the workers' (summed by
    # prometheus_client's multiprocess collector).
    found = re.findall(r'^callrec_(?:calls|front)_refused_total\{status="403"\} (\S+)$', text, re.M)
    return sum(float(value) for value in found)


# ---------------------------------------------------------------- large INVITEs


def big_metadata(size: int) -> str:
    """An RFC 7865 document of about ``size`` bytes: the call's three parties, then
    more participants (conference members, a supervisor) and extension data, as SBCs
    send them."""
    parties = [
        Party("cHJ0LWN1c3Q=", CUSTOMER_AOR, "Asiakas", "1"),
        Party("cHJ0LXN2Yw==", SERVICE_AOR),
        Party("cHJ0LWVtcGw=", "sip:1001@pbx.example", "Aino Virtanen", "2"),
    ]
    doc = metadata_xml(parties).removesuffix("</recording>\n")
    extra: list[str] = []
    index, total = 0, len(doc)
    while total < size - 200:
        extra.append(
            f'<participant participant_id="eHRyYS{index:04d}"><nameID aor="sip:queue-{index}'
            f'@acd.example"><name xml:lang="fi">Jono {index}</name></nameID></participant>\n'
            f'<extensiondata xmlns:x="urn:example:acd"><x:skill>parcels-{index}</x:skill>'
            f"<x:note>{'wait-music ' * 8}</x:note></extensiondata>\n"
        )
        index, total = index + 1, total + len(extra[-1])
    return doc + "".join(extra) + "</recording>\n"


SIZES_KB = (3.5, 5, 16, 60)


@pytest.mark.slow
@pytest.mark.alone
def test_invites_up_to_64_kb_are_stored_with_every_party_and_both_channels(
    idle: Pool, speech: Speech, tmp_path: Path
) -> None:
    pool = idle
    calls = {
        f"{transport}-{kb}": replace(
            pool.call(metadata=big_metadata(int(kb * 1024) - 900)), call_ms=6000
        )
        for transport in ("udp", "tcp")
        for kb in SIZES_KB
    }
    scenarios = {name: siprec_scenario(call) for name, call in calls.items()}
    for name, scenario in scenarios.items():
        invite = scenario.split("<![CDATA[", 1)[1].split("]]>", 1)[0]
        wanted = float(name.split("-")[1]) * 1024
        assert abs(len(invite) - wanted) < 600, (name, len(invite))
    _, rows = place_and_store(pool, scenarios)
    for name, row in rows.items():
        assert (row.source, row.channels) == ("siprec", 2), name
        assert row.customer_masked == "+358401234***", name
        assert employees(row) == [AINO], name
        assert row.service_number == "+35898765432", name
        assert flags(row) == set(), (name, row.flags)
    for name in rows:  # silent channels above ~3.9 KB were the bug: every size is heard
        audio = pool.export(rows[name], tmp_path / f"{name}.ogg")
        assert carries(audio, 0, speech.customer, speech.employee), name
        assert carries(audio, 1, speech.employee, speech.customer), name
    assert FULL_NUMBER not in pool.text() and NATIONAL not in pool.text()
    pool.wait_idle()


def _tcp_invite(pool: Pool, body_bytes: int, call_id: str) -> bytes:
    """Send one INVITE with a body of ``body_bytes`` over TCP; the first response line."""
    body = big_metadata(body_bytes).encode()
    head = (
        f"INVITE sip:srs@127.0.0.1:{pool.sip_port} SIP/2.0\r\n"
        "Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-big-1\r\n"
        "From: <sip:src@127.0.0.1>;tag=1\r\nTo: <sip:srs@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        "Contact: <sip:src@127.0.0.1:5999;transport=tcp>\r\nRequire: siprec\r\n"
        f"Content-Type: application/rs-metadata+xml\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(pool.target, timeout=10) as conn:
        conn.sendall(head.encode() + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.partition(b"\r\n")[0]


@pytest.mark.parametrize("size", [70 * 1024, 2 * 1024 * 1024])
def test_larger_invites_get_513_over_tcp(idle: Pool, size: int) -> None:
    """Past [sip] max_message (64 KB) the front answers 513 and logs it, even for a
    2 MB INVITE (its TCP read buffer holds that much); nothing reaches a worker."""
    call_id = f"big-{size}-{time.monotonic_ns()}"
    assert _tcp_invite(idle, size, call_id) == b"SIP/2.0 513 Message Too Large"
    wait_log(idle, f"call_ref={call_ref(call_id)} status=513 reason=message_too_large")
    _not_stored(idle, call_id, wait_s=0.5)
    assert FULL_NUMBER not in idle.text()


def test_metadata_silent_call_takes_service_and_employee_from_the_clients_headers(
    idle: Pool, speech: Speech, tmp_path: Path
) -> None:
    """The SBC's metadata names the caller and an extension nobody knows; its
    [[sip.clients]] entry (matched on the address the front saw) names the headers
    that carry the service line and the agent."""
    pool = idle
    call = pool.call(
        customer=CUSTOMER_AOR,
        service=None,
        employee="sip:7777@pbx.example",
        call_ms=4000,
        extra_headers=(
            "P-Called-Party-ID: <sip:+35898765432@pbx.example;user=phone>",
            "X-Agent: <sip:1001@pbx.example>",
        ),
    )
    _, rows = place_and_store(pool, {"silent": siprec_scenario(call)})
    row = rows["silent"]
    assert row.service_number == "+35898765432"
    assert employees(row) == [AINO]
    assert flags(row) == set(), row.flags
    assert row.customer_masked == "+358401234***"


@pytest.mark.parametrize("source", sorted(SERVICE_SOURCES))
def test_metadata_silent_on_the_service_line_takes_it_from_the_clients_source(
    idle: Pool, source: str
) -> None:
    """The metadata names the caller and the agent only; the client's entry (matched
    on the address the front saw) says where the service line comes from: a fixed
    number, the first ``Diversion`` entry, or the first ``History-Info`` entry."""
    pool = idle
    address, _ = SERVICE_SOURCES[source]
    call = pool.call(
        customer=CUSTOMER_AOR, service=None, call_ms=2000, extra_headers=SERVICE_HEADERS[source]
    )
    result = pool.run(siprec_scenario(call), source, timeout_s=20, local_ip=address)
    assert result.ok, result.errors[-1500:]
    row = pool.stored(result.call_id)
    assert row.service_number == "+35898765432"
    assert employees(row) == [AINO] and row.customer_masked == "+358401234***"
    assert flags(row) == set(), row.flags
    assert FULL_NUMBER not in pool.text()


@pytest.mark.slow
def test_transfer_with_large_metadata_in_a_reinvite_reaches_the_recording(
    idle: Pool, tmp_path: Path
) -> None:
    """A 20 KB metadata update in a re-INVITE (a transfer to Mikko) goes the same way
    as the INVITE's: kept aside by the front, fetched by the worker."""
    pool = idle
    transfer = big_metadata(20 * 1024).replace("sip:1001@pbx.example", "sip:1002@x")
    call = pool.call(customer=CUSTOMER_AOR, call_ms=6000,
                     midcall=(Midcall(2500, metadata=transfer),))  # fmt: skip
    _, rows = place_and_store(pool, {"transfer": siprec_scenario(call)})
    assert employees(rows["transfer"]) == [AINO, ("e1002", "Mikko Korhonen")]
    assert FULL_NUMBER not in pool.text()


# ---------------------------------------------------------------- SIP over TLS


class TlsSrc:
    """A minimal SRC over TLS (SIPp here is built without TLS): one SIPREC call through
    the front, its dialog routed by the 200's Record-Route set."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            self.conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
        except OSError:
            raw.close()
            raise
        self.local = self.conn.getsockname()
        self.call_id = f"tls-{time.monotonic_ns()}@127.0.0.1"
        self.buffer = b""

    def __enter__(self) -> TlsSrc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def request(self, method: str, uri: str, cseq: int, extra: str = "", body: str = "") -> None:
        host, port = self.local[0], self.local[1]
        head = (
            f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/TLS {host}:{port};branch=z9hG4bK-{cseq}"
            f"{method.lower()}\r\nFrom: <sip:src@{host}>;tag=tlssrc\r\n{extra}"
            f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\n"
            f"Contact: <sip:src@{host}:{port};transport=tls>\r\n"
            f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
        )
        self.conn.sendall(head.encode())

    def response(self, status: int) -> dict[str, list[str]]:
        """Headers (and "body") of the next response with this status."""
        while True:
            while b"\r\n\r\n" not in self.buffer:
                chunk = self.conn.recv(65535)
                if not chunk:
                    raise ConnectionError("the front closed the connection")
                self.buffer += chunk
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            headers: dict[str, list[str]] = {}
            for line in head.decode().split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            length = int(headers.get("content-length", ["0"])[0])
            while len(rest) < length:
                rest += self.conn.recv(65535)
            self.buffer = rest[length:]
            if head.startswith(f"SIP/2.0 {status} ".encode()):
                headers["body"] = [rest[:length].decode()]
                return headers

    def in_dialog(self, method: str, cseq: int, answer: dict[str, list[str]]) -> None:
        routes = [r for value in answer["record-route"] for r in value.split(",")]
        target = answer["contact"][0].strip("<>").split(">")[0]
        extra = "".join(f"Route: {r.strip()}\r\n" for r in reversed(routes))
        self.request(method, target, cseq, extra + f"To: {answer['to'][0]}\r\n")


def _tls_files(root: Path) -> dict[str, object]:
    ca = new_ca("test SIP CA")
    (root / "ca.pem").write_bytes(ca.cert_pem)
    cert, key = write_pair(root, "front", issue_store(ca))
    write_pair(root, "sbc", issue_agent(ca, "sbc-1"))
    return {"tls_cert_file": str(cert), "tls_key_file": str(key),
            "tls_ca_file": str(root / "ca.pem")}  # fmt: skip


def _siprec_body(call: SiprecCall) -> str:
    sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n" + "".join(
        f"m=audio {port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=label:{label}\r\na=sendonly\r\n"
        for port, label in zip(call.rtp_ports, call.labels, strict=True)
    )
    return (
        f"--b\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n--b\r\n"
        "Content-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session"
        f"\r\n\r\n{call.metadata_document()}\r\n--b--\r\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so").exists(),
    reason="Kamailio's tls module not installed (Debian: kamailio-tls-modules)",
)
def test_sip_over_tls_needs_a_client_certificate_and_records(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tmp_path = tmp_path_factory.mktemp("tls")  # short: the ctl socket's path has a limit
    (tmp_path / "tls").mkdir()
    files = _tls_files(tmp_path / "tls")
    tls_port = free_port()
    with running_pool(tmp_path / "pool", workers=1, tls_port=tls_port, **files) as pool:
        anonymous = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
        with pytest.raises(OSError), TlsSrc(tls_port, anonymous) as nobody:
            nobody.request("OPTIONS", f"sip:127.0.0.1:{tls_port}", 1, "To: <sip:x@y>\r\n")
            nobody.response(200)  # ssl.SSLError or ConnectionError: no certificate
        context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem"))
        context.load_cert_chain(tmp_path / "tls" / "sbc.pem", tmp_path / "tls" / "sbc.key")
        with TlsSrc(tls_port, context) as src:
            call = pool.call(customer=CUSTOMER_AOR)
            src.request(
                "INVITE", f"sip:srs@127.0.0.1:{tls_port};transport=tls", 1,
                "To: <sip:srs@127.0.0.1>\r\nRequire: siprec\r\n"
                "Content-Type: multipart/mixed;boundary=b\r\n",
                _siprec_body(call),
            )  # fmt: skip
            answer = src.response(200)
            answered = time.time()
            src.in_dialog("ACK", 1, answer)
            ports = re.findall(r"m=audio (\d+)", answer["body"][0])
            ip = re.search(r"c=IN IP4 ([\d.]+)", answer["body"][0])
            assert ip is not None and len(ports) == 2
            specs = [
                f"{ip.group(1)}:{port}={wav},src={src_port}"
                for port, wav, src_port in zip(
                    ports, (pool.speech.customer, pool.speech.employee), call.rtp_ports, strict=True
                )
            ]
            with pool.rtp.open("w") as fifo:
                fifo.write(" ".join(specs) + "\n")
            time.sleep(8)
            src.in_dialog("BYE", 2, answer)
            src.response(200)
        row = pool.stored(src.call_id)
        assert abs(row.started_at_ms - answered * 1000) <= 1000
        assert row.customer_masked == "+358401234***" and employees(row) == [AINO]
        # Both parties' speech reached their channels (whose is whose: the large-INVITE
        # test; this one is about the transport, its RTP injected after a TLS dialog).
        assert min(channel_rms(pool.export(row, tmp_path / "tls.ogg"))) > 300
        assert "rtp_received_lost=customer:" in pool.text()
