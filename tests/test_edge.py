"""The SIP edge's pure checks (agent.recorder.front.edge) and its ``[sip]`` keys; the real
processes are in test_worker.py and test_front_edge.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, SipClient, SipConfig
from agent.recorder.front.edge import admit, metadata_token, part_content, source_ip, truncated
from tests.support.stack import Keys, agent_config

SDP = "v=0\r\nm=audio 4000 RTP/AVP 8\r\n"
MULTI = (
    "--b\r\nContent-Type: application/sdp\r\n\r\n" + SDP + "\r\n"
    "--b\r\nContent-Type: application/rs-metadata+xml\r\n\r\n<recording/>\r\n--b--\r\n"
)


def invite(body: str, content_type: str, length: int | None = None, extra: str = "") -> str:
    size = len(body.encode()) if length is None else length
    return (
        f"INVITE sip:srs@x SIP/2.0\r\nCall-ID: c\r\n{extra}Content-Type: {content_type}\r\n"
        f"Content-Length: {size}\r\n\r\n{body}"
    )


def test_whole_requests_pass() -> None:
    assert truncated(invite(MULTI, "multipart/mixed;boundary=b")) is None
    assert truncated(invite(SDP, "application/sdp")) is None


def test_a_request_cut_by_the_transport_is_noticed() -> None:
    """What pjsip hands on when a message was longer than it reads (~4,000 bytes)."""
    whole = invite(MULTI, "multipart/mixed;boundary=b")
    assert "Content-Length" in (truncated(whole[:-40]) or "")
    cut = invite(MULTI[:-30], 'multipart/mixed; boundary="b"')  # length fixed up by a proxy
    assert "close delimiter" in (truncated(cut) or "")
    assert truncated("INVITE sip:x SIP/2.0\r\nCall-ID: c\r\n") == "no end of headers"


@pytest.mark.parametrize(
    ("source", "ip"),
    [("127.0.0.1:5060", "127.0.0.1"), ("[::1]:5060", "::1"), ("10.0.0.7", "10.0.0.7"),
     ("x:1", None)],
)  # fmt: skip
def test_source_address(source: str, ip: str | None) -> None:
    assert source_ip(source) == ip


def test_admission_without_front_checks_the_allow_list() -> None:
    sip = SipConfig(allowed_clients=("10.1.2.0/24",), clients=(SipClient("192.0.2.7/32"),))
    assert admit(sip, "10.1.2.9:5060", "").refusal is None
    assert admit(sip, "192.0.2.7:5060", "").refusal is None  # a [[sip.clients]] address
    assert admit(sip, "127.0.0.1:5060", "").refusal == "client_not_allowed"


def test_admission_behind_the_front_trusts_only_the_fronts_source_header() -> None:
    sip = SipConfig(front=True, port=5070, allowed_clients=("10.1.2.0/24",))
    raw = invite(SDP, "application/sdp", extra="X-Callrec-Source: 10.1.2.9\r\n")
    admitted = admit(sip, "127.0.0.1:5070", raw)
    assert (admitted.client_ip, admitted.refusal) == ("10.1.2.9", None)
    assert admit(sip, "127.0.0.1:5999", raw).refusal == "not_from_front"
    assert admit(sip, "10.1.2.9:5070", raw).refusal == "not_from_front"
    stranger = invite(SDP, "application/sdp", extra="X-Callrec-Source: 203.0.113.5\r\n")
    assert admit(sip, "127.0.0.1:5070", stranger).refusal == "client_not_allowed"


def test_metadata_token_must_look_like_one() -> None:
    assert metadata_token(invite(SDP, "a/b", extra="X-Callrec-Metadata: ab12cd34-5-6\r\n"))
    assert metadata_token(invite(SDP, "a/b", extra="X-Callrec-Metadata: ../../etc\r\n")) is None


def test_part_headers_kamailio_keeps_are_dropped() -> None:
    disposition = "Content-Disposition: recording-session\r\n\r\n<recording/>\r\n"
    assert part_content(disposition) == "<recording/>\r\n"
    assert part_content("\r\n<recording/>") == "\r\n<recording/>"


def test_sip_edge_keys(tmp_path: Path, keys: Keys) -> None:
    sip = {
        "allowed_clients": ["10.1.2.0/24", "192.0.2.7", "2001:db8::/32"],
        "plain": True,
        "clients": [
            {"address": "10.1.2.0/24", "service_header": "P-Called-Party-ID"},
            {"address": "192.0.2.7", "service_number": "+358 9 876 5432",
             "employee_header": "X-Agent"},
        ],
    }  # fmt: skip
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip_port=5070, sip=sip)
    assert cfg.sip.allowed_clients == ("10.1.2.0/24", "192.0.2.7/32", "2001:db8::/32")
    assert cfg.sip.plain and cfg.sip.client("10.1.2.3") == SipClient(
        "10.1.2.0/24", "P-Called-Party-ID"
    )
    assert cfg.sip.client("192.0.2.7") == SipClient(
        "192.0.2.7/32", None, "+358 9 876 5432", "X-Agent"
    )
    default, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip_port=5070)
    assert default.sip.allows("127.0.0.1") and not default.sip.allows("10.1.2.3")
    assert not default.sip.plain


@pytest.mark.parametrize(
    ("sip", "message"),
    [
        ({"allowed_clients": ["10.1.2.5/24"]}, '[sip] allowed_clients = "10.1.2.5/24": expected'),
        ({"allowed_clients": ["pbx.example"]}, '[sip] allowed_clients = "pbx.example"'),
        ({"allowed_clients": "10.0.0.1"}, '[sip] allowed_clients = "10.0.0.1": expected a list'),
        ({"clients": [{"service_header": "X"}]}, "[sip.clients.0] address: missing"),
        ({"clients": [{"address": "10.0.0.1", "colour": 1}]}, "[sip.clients.0] colour: unknown"),
        (
            {"clients": [{"address": "10.0.0.1", "employee_header": "X Agent"}]},
            '[sip.clients.0] employee_header = "X Agent": expected a SIP header name',
        ),
        (
            {"clients": [{"address": "10.0.0.1", "service_header": "D", "service_number": "1"}]},
            '[sip.clients.0] service_number = "1": expected no service_header beside it',
        ),
    ],
)
def test_bad_sip_edge_keys_are_named(
    tmp_path: Path, keys: Keys, sip: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config(tmp_path, keys, "127.0.0.1:1", sip_port=5070, sip=sip)
    assert str(exc.value).startswith(message), str(exc.value)
