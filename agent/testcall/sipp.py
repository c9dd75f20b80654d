"""SIPp as the PBX: SIPREC (and plain) UAC scenarios and a runner.

:func:`siprec_scenario` renders one call: an INVITE with ``Require: siprec`` and a
``multipart/mixed`` body (SDP with two ``sendonly`` m-lines labelled 1 and 2, and the
``application/rs-metadata+xml`` document naming the participants), the two RTP ports
taken from the 200's SDP with ``ereg``, ACK, the RTP sender started with ``exec``,
a pause for the call's length, BYE. ``<log>`` actions stamp the moment the 200
arrived and the moment the BYE left; :func:`run_sipp` reads them back as epoch
seconds (:attr:`SippResult.answered_at`, :attr:`SippResult.bye_at`).

Variants: malformed metadata XML, no metadata at all, a withheld customer
(``sip:anonymous@anonymous.invalid``), an unknown employee extension — all by
choosing the :class:`SiprecCall` fields — and a plain one-stream INVITE with the
parties in headers (:func:`plain_scenario`).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

RFC7865_NS = "urn:ietf:params:xml:ns:recording:1"
BOUNDARY = "callrec-boundary-7865"
MALFORMED_METADATA = (
    f'<?xml version="1.0" encoding="UTF-8"?>\n<recording xmlns="{RFC7865_NS}">\n'
    '<participant participant_id="p1"><nameID aor="sip:1001@pbx.example">\n'
    "</recording>\n"
)


class _Ports:
    """Hands out UDP ports below the kernel's ephemeral range (32768+), so that no
    socket bound to port 0 meanwhile (SIPp, a gRPC client…) can take one we chose."""

    LOW, HIGH = 21000, 32700

    def __init__(self) -> None:
        self.cursor = self.LOW + (os.getpid() * 7919) % (self.HIGH - self.LOW)

    @staticmethod
    def _bindable(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def take(self, count: int) -> int:
        for _ in range((self.HIGH - self.LOW) // count):
            if self.cursor + count > self.HIGH:
                self.cursor = self.LOW
            start, self.cursor = self.cursor, self.cursor + count
            if all(self._bindable(p) for p in range(start, start + count)):
                return start
        raise RuntimeError(f"no {count} free consecutive UDP ports")


_PORTS = _Ports()


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive UDP ports on 127.0.0.1 that are free now."""
    return _PORTS.take(count)


# ---------------------------------------------------------------- metadata


@dataclass(frozen=True)
class Party:
    participant_id: str
    aor: str | None  # None: a participant without nameID
    name: str | None = None
    sends: str | None = None  # the a=label of the stream this party sends


def metadata_xml(
    parties: Sequence[Party],
    namespace: str = RFC7865_NS,
    inline_send: bool = False,
) -> str:
    """An RFC 7865 document (or the older draft shape with ``<send>`` inside
    ``<participant>`` when ``inline_send``)."""
    labels = sorted({p.sends for p in parties if p.sends})
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<recording xmlns="{namespace}">',
        "<datamode>complete</datamode>",
        '<session session_id="c2Vzc2lvbjE="><sipSessionID>abc;remote=def</sipSessionID></session>',
    ]
    for party in parties:
        lines.append(f"<participant participant_id={quoteattr(party.participant_id)}>")
        if party.aor is not None:
            lines.append(f"<nameID aor={quoteattr(party.aor)}>")
            if party.name:
                lines.append(f'<name xml:lang="fi">{escape(party.name)}</name>')
            lines.append("</nameID>")
        if inline_send and party.sends:
            lines.append(f"<send>stream-{escape(party.sends)}</send>")
        lines.append("</participant>")
    for label in labels:
        lines.append(
            f'<stream stream_id="stream-{escape(label)}" session_id="c2Vzc2lvbjE=">'
            f"<label>{escape(label)}</label></stream>"
        )
    if not inline_send:
        for party in parties:
            if party.sends:
                lines.append(
                    f"<participantstreamassoc participant_id={quoteattr(party.participant_id)}>"
                    f"<send>stream-{escape(party.sends)}</send></participantstreamassoc>"
                )
    lines.append("</recording>")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class SiprecCall:
    customer_wav: Path
    employee_wav: Path
    customer: str = "sip:+358401234567@pbx.example"
    employee: str = "sip:1001@pbx.example"
    employee_name: str | None = "Aino Virtanen"
    service: str | None = "sip:+358201234567@pbx.example"
    direction: str = "inbound"  # inbound: customer first; outbound: employee first
    customer_label: str = "1"  # which m-line (a=label) the customer sends
    metadata: str | None = None  # None: built from the fields above
    with_metadata: bool = True  # False: an SDP-only body (still Require: siprec)
    call_ms: int = 8000
    rtp_ports: tuple[int, int] = field(default_factory=lambda: (free_port(), free_port()))
    rtp_via: tuple[str, int] | None = None  # a running ControlServer, or send ourselves
    rtp_pidfile: Path | None = None

    @property
    def employee_label(self) -> str:
        return "2" if self.customer_label == "1" else "1"

    def parties(self) -> list[Party]:
        customer = Party("cHJ0LWN1c3Q=", self.customer, None, self.customer_label)
        employee = Party("cHJ0LWVtcGw=", self.employee, self.employee_name, self.employee_label)
        service = [Party("cHJ0LXN2Yw==", self.service)] if self.service else []
        if self.direction == "inbound":
            return [customer, *service, employee]
        return [employee, *service, customer]

    def metadata_document(self) -> str:
        return self.metadata if self.metadata is not None else metadata_xml(self.parties())


def _sdp(ports: Sequence[int], labels: Sequence[str | None]) -> str:
    lines = ["v=0", "o=- 1 1 IN IP4 [media_ip]", "s=-", "c=IN IP4 [media_ip]", "t=0 0"]
    for port, label in zip(ports, labels, strict=True):
        lines += [f"m=audio {port} RTP/AVP 8", "a=rtpmap:8 PCMA/8000"]
        lines += [f"a=label:{label}"] if label else []
        lines += ["a=sendonly"]
    return "\n".join(lines)


def _invite(content_type: str, body: str, extra_headers: Sequence[str] = ()) -> str:
    headers = [
        "INVITE sip:srs@[remote_ip]:[remote_port] SIP/2.0",
        "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]",
        "From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]",
        "To: <sip:srs@[remote_ip]:[remote_port]>",
        "Call-ID: [call_id]",
        "CSeq: 1 INVITE",
        "Contact: <sip:src@[local_ip]:[local_port]>;+sip.src",
        "Max-Forwards: 70",
        *extra_headers,
        f"Content-Type: {content_type}",
        "Content-Length: [len]",
    ]
    return "\n".join(headers) + "\n\n" + body + "\n"


def _rtp_command(specs: Sequence[str], via: tuple[str, int] | None, pidfile: Path | None) -> str:
    args = [sys.executable, "-m", "agent.testcall.rtp"]
    for spec in specs:
        args += ["--to", spec]
    if via is not None:
        args += ["--via", f"{via[0]}:{via[1]}"]
    if pidfile is not None:
        args += ["--pidfile", str(pidfile)]
    return " ".join(shlex.quote(a) for a in args)


_ANSWER = """
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rrs="true">
    <action>
      <ereg regexp="c=IN IP4 ([0-9.]+)" search_in="body" check_it="true" assign_to="c,ip"/>
{eregs}
      <log message="answered [timestamp]"/>
      <log message="call_id [call_id]"/>
    </action>
  </recv>
  <Reference variables="c,m"/>
  <send>
    <![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
[routes]
From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
"""

_HANGUP = """
  <pause milliseconds="{call_ms}"/>
  <nop><action><log message="bye [timestamp]"/></action></nop>
  <send retrans="500">
    <![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
[routes]
From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 2 BYE
Max-Forwards: 70
Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
"""


def _scenario(name: str, invite: str, streams: int, exec_command: str, ms: int) -> str:
    """``streams`` audio ports from the 200's SDP become ``[$p1]``, ``[$p2]``…, the
    first c= address ``[$ip]`` (pjsua writes c= per m-line)."""
    regexp = " .*".join(["m=audio ([0-9]+)"] * streams) + " "
    assign = ",".join(["m", *(f"p{n}" for n in range(1, streams + 1))])
    ereg = (
        f'      <ereg regexp={quoteattr(regexp)} search_in="body" check_it="true"'
        f' assign_to="{assign}"/>'
    )
    return (
        '<?xml version="1.0" encoding="ISO-8859-1" ?>\n'
        f"<scenario name={quoteattr(name)}>\n"
        f'  <send retrans="500">\n    <![CDATA[\n{invite}\n    ]]>\n  </send>\n'
        + _ANSWER.format(eregs=ereg)
        + f"  <nop><action><exec command={quoteattr(exec_command)}/></action></nop>\n"
        + _HANGUP.format(call_ms=ms)
        + "</scenario>\n"
    )


def siprec_scenario(call: SiprecCall) -> str:
    """A SIPREC call: two labelled sendonly streams, metadata, real speech, BYE."""
    labels = ("1", "2")
    sdp = _sdp(call.rtp_ports, labels)
    if call.with_metadata:
        body = (
            f"--{BOUNDARY}\nContent-Type: application/sdp\n\n{sdp}\n"
            f"--{BOUNDARY}\nContent-Type: application/rs-metadata+xml\n"
            f"Content-Disposition: recording-session\n\n{call.metadata_document()}"
            f"--{BOUNDARY}--"
        )
        content_type = f"multipart/mixed;boundary={BOUNDARY}"
    else:
        body, content_type = sdp, "application/sdp"
    invite = _invite(content_type, body, ["Require: siprec", "Supported: siprec"])
    wav_by_label = {call.customer_label: call.customer_wav, call.employee_label: call.employee_wav}
    specs = [
        f"[$ip]:[$p{n}]={wav_by_label[label]},src={port}"
        for n, (label, port) in enumerate(zip(labels, call.rtp_ports, strict=True), 1)
    ]
    command = _rtp_command(specs, call.rtp_via, call.rtp_pidfile)
    return _scenario("siprec", invite, 2, command, call.call_ms)


def plain_scenario(
    wav: Path,
    headers: dict[str, str],
    call_ms: int = 5000,
    rtp_port: int | None = None,
    rtp_via: tuple[str, int] | None = None,
) -> str:
    """A plain INVITE with one sendrecv-less (sendonly) stream; parties in headers."""
    port = rtp_port or free_port()
    sdp = _sdp([port], [None])
    invite = _invite("application/sdp", sdp, [f"{k}: {v}" for k, v in headers.items()])
    command = _rtp_command([f"[$ip]:[$p1]={wav},src={port}"], rtp_via, None)
    return _scenario("plain", invite, 1, command, call_ms)


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class SippResult:
    returncode: int
    stdout: str
    errors: str  # the -trace_err file: unexpected messages, timeouts
    log: str  # the <log> actions
    answered_at: float | None  # epoch seconds: SIPp received the 200 OK
    bye_at: float | None  # epoch seconds: SIPp sent the BYE
    call_id: str | None  # the Call-ID SIPp generated
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# SIPp's [timestamp] ends with the epoch time: "2024-01-02\t03:04:05.678901\t1704164645.678901"
_STAMP = re.compile(r"^(answered|bye) .*?(\d{9,}\.\d+)\s*$", re.MULTILINE)


_CALL_ID = re.compile(r"^call_id (\S+)\s*$", re.MULTILINE)


def _stamps(log_text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in _STAMP.finditer(log_text)}


def run_sipp(
    scenario_xml: str,
    target: tuple[str, int],
    workdir: Path,
    *,
    timeout_s: float = 60.0,
    calls: int = 1,
    rate: float | None = None,
    extra_args: Sequence[str] = (),
) -> SippResult:
    """Run SIPp in the foreground (never ``-bg``) and report what happened."""
    workdir.mkdir(parents=True, exist_ok=True)
    scenario = workdir / "scenario.xml"
    scenario.write_text(scenario_xml)
    errors, logs = workdir / "sipp_errors.log", workdir / "sipp_logs.log"
    for stale in (errors, logs):
        stale.unlink(missing_ok=True)
    args = [
        "sipp", f"{target[0]}:{target[1]}", "-sf", str(scenario),
        "-m", str(calls), "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(free_port(4)),
        "-timeout", f"{int(timeout_s)}s", "-timeout_error", "-nostdin",
        "-trace_err", "-error_file", str(errors), "-trace_logs", "-log_file", str(logs),
        *(["-r", str(rate)] if rate else []),
        *extra_args,
    ]  # fmt: skip
    env = dict(os.environ)
    started = time.monotonic()
    proc = subprocess.run(
        args,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s + 15,
        check=False,
    )
    log_text = logs.read_text() if logs.exists() else ""
    stamps = _stamps(log_text)
    return SippResult(
        returncode=proc.returncode,
        stdout=proc.stdout[-4000:],
        errors=errors.read_text(errors="replace") if errors.exists() else "",
        log=log_text,
        answered_at=stamps.get("answered"),
        bye_at=stamps.get("bye"),
        call_id=call_id.group(1) if (call_id := _CALL_ID.search(log_text)) else None,
        elapsed_s=time.monotonic() - started,
    )
