"""SIPp scenarios of an SRC (the PBX/SBC) for the recorder: one call per run of the
scenario (SIPp may run it many times at once, ``-m N -l N``).

:func:`siprec_scenario` renders a SIPREC call: an INVITE with ``Require: siprec`` and
a ``multipart/mixed`` body (SDP with two labelled m-lines, the
``application/rs-metadata+xml`` part before or after it, with or without
Content-Disposition, either namespace), the two RTP ports taken from the 200's SDP
with ``ereg``, ACK, the RTP sender started with ``exec``, things done mid-call
(:class:`Midcall`: hold/resume, session-timer refresh, a metadata update in a
re-INVITE or UPDATE), then the SRC's BYE or — a vanished SRC — waiting for the
recorder's. Through a record-routing front the route set of the 200 is kept
(``rrs``) and in-dialog requests go to ``[next_url]`` with ``[routes]``.
:func:`cancel_scenario` gives up before the answer; :func:`plain_scenario` sends one
mixed stream with the parties in headers.

``<log>`` actions stamp events with the call's Call-ID and epoch time (read back by
:func:`agent.testcall.sipp.run_sipp`): ``answered``, ``bye`` (the SRC sent BYE),
``bye_received`` (the recorder hung up), ``refused`` (486/503), ``cancelled``.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from agent.testcall.ports import free_port

RFC7865_NS = "urn:ietf:params:xml:ns:recording:1"
DRAFT_NS = "urn:ietf:params:xml:ns:recording"
BOUNDARY = "callrec-boundary-7865"
MALFORMED_METADATA = (
    f'<?xml version="1.0" encoding="UTF-8"?>\n<recording xmlns="{RFC7865_NS}">\n'
    '<participant participant_id="p1"><nameID aor="sip:1001@pbx.example">\n'
    "</recording>\n"
)
_FROM = "From: <sip:src@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]"
_VIA = "Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]"


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


# ---------------------------------------------------------------- the call


@dataclass(frozen=True)
class Midcall:
    """Something the SRC does ``at_ms`` after its ACK: a re-INVITE (``sdp_direction``
    ``inactive`` pauses the recording, ``sendonly`` resumes it; the same SDP again with
    ``session_expires`` is a session-timer refresh) or an UPDATE, either of them with
    a new metadata document (a transfer)."""

    at_ms: int
    method: str = "INVITE"
    sdp_direction: str | None = "sendonly"  # None: no SDP in the request
    metadata: str | None = None
    session_expires: int | None = None
    expect: int = 200  # the final answer expected (pjsip refuses a body without SDP: 488)


@dataclass(frozen=True)
class SiprecCall:
    customer_wav: Path
    employee_wav: Path
    customer: str = "sip:+358401234567@pbx.example"
    employee: str = "sip:1001@pbx.example"
    employee_name: str | None = "Aino Virtanen"
    customer_name: str | None = None
    service: str | None = "sip:+358201234567@pbx.example"
    direction: str = "inbound"  # inbound: customer first; outbound: employee first
    labels: tuple[str, str] = ("1", "2")  # a=label of the first and second m-line
    customer_label: str = "1"  # which m-line (a=label) the customer sends
    metadata: str | None = None  # None: built from the fields above
    with_metadata: bool = True  # False: an SDP-only body (still Require: siprec)
    metadata_first: bool = False  # the metadata part before the SDP part
    disposition: bool = True  # Content-Disposition: recording-session on the metadata
    namespace: str = RFC7865_NS
    inline_send: bool = False  # <send> inside <participant> (no participantstreamassoc)
    sdp_direction: str = "sendonly"  # "inactive": the SRC starts paused
    session_expires: int | None = None  # RFC 4028 session timer in the INVITE
    midcall: tuple[Midcall, ...] = ()
    hangup: str = "src"  # "src" sends BYE after call_ms; "srs": waits for the recorder's
    accept_refusal: bool = False  # a 486/503 ends the call cleanly (load tests)
    call_ms: int = 8000
    call_ms_spread: int = 0  # > 0: each call lasts call_ms + uniform(0, spread) ms
    rtp_ports: tuple[int, int] = field(default_factory=lambda: (free_port(), free_port()))
    rtp_bind: bool = True  # send from the offered ports (one call per SIPp run only)
    # a running ControlServer's address or FifoControl's path, or send ourselves
    rtp_via: tuple[str, int] | Path | None = None
    rtp_pidfile: Path | None = None
    extra_headers: tuple[str, ...] = ()  # e.g. "P-Called-Party-ID: <sip:+358…@pbx>"

    @property
    def employee_label(self) -> str:
        return self.labels[1] if self.customer_label == self.labels[0] else self.labels[0]

    def parties(self) -> list[Party]:
        customer = Party("cHJ0LWN1c3Q=", self.customer, self.customer_name, self.customer_label)
        employee = Party("cHJ0LWVtcGw=", self.employee, self.employee_name, self.employee_label)
        service = [Party("cHJ0LXN2Yw==", self.service)] if self.service else []
        if self.direction == "inbound":
            return [customer, *service, employee]
        return [employee, *service, customer]

    def metadata_document(self) -> str:
        if self.metadata is not None:
            return self.metadata
        return metadata_xml(self.parties(), self.namespace, self.inline_send)


# ---------------------------------------------------------------- SIP messages


def sdp(ports: Sequence[int], labels: Sequence[str | None], direction: str, version: int) -> str:
    lines = ["v=0", f"o=- 1 {version} IN IP4 [media_ip]", "s=-", "c=IN IP4 [media_ip]", "t=0 0"]
    for port, label in zip(ports, labels, strict=True):
        lines += [f"m=audio {port} RTP/AVP 8", "a=rtpmap:8 PCMA/8000"]
        lines += [f"a=label:{label}"] if label else []
        lines += [f"a={direction}"]
    return "\n".join(lines)


def _multipart(sdp_text: str, metadata: str, call: SiprecCall) -> tuple[str, str]:
    disposition = "Content-Disposition: recording-session\n" if call.disposition else ""
    sdp_part = f"Content-Type: application/sdp\n\n{sdp_text}\n"
    meta_part = f"Content-Type: application/rs-metadata+xml\n{disposition}\n{metadata}"
    if not meta_part.endswith("\n"):
        meta_part += "\n"
    parts = (meta_part, sdp_part) if call.metadata_first else (sdp_part, meta_part)
    body = "".join(f"--{BOUNDARY}\n{part}" for part in parts) + f"--{BOUNDARY}--"
    return f"multipart/mixed;boundary={BOUNDARY}", body


def _request(
    method: str, cseq: int, body: tuple[str, str] | None, headers: Sequence[str] = ()
) -> str:
    """An in-dialog request through the route set of the 200 (``[routes]``)."""
    lines = [
        f"{method} [next_url] SIP/2.0",
        _VIA,
        "[routes]",
        _FROM,
        "[last_To:]",
        "Call-ID: [call_id]",
        f"CSeq: {cseq} {method}",
        "Contact: <sip:src@[local_ip]:[local_port]>;+sip.src",
        "Max-Forwards: 70",
        *headers,
    ]
    if body is None:
        return "\n".join([*lines, "Content-Length: 0"]) + "\n\n"
    content_type, text = body
    lines += [f"Content-Type: {content_type}", "Content-Length: [len]"]
    return "\n".join(lines) + "\n\n" + text + "\n"


def _invite(content_type: str, body: str, extra_headers: Sequence[str] = ()) -> str:
    headers = [
        "INVITE sip:srs@[remote_ip]:[remote_port] SIP/2.0",
        _VIA,
        _FROM,
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


def _hop_ack(branch_offset: int) -> str:
    """ACK of a final non-2xx answer: hop by hop, the INVITE's branch."""
    return (
        "\n".join(
            [
                "ACK sip:srs@[remote_ip]:[remote_port] SIP/2.0",
                f"Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-{branch_offset}]",
                _FROM,
                "[last_To:]",
                "Call-ID: [call_id]",
                "CSeq: 1 ACK",
                "Max-Forwards: 70",
                "Content-Length: 0",
            ]
        )
        + "\n\n"
    )


def rtp_command(
    specs: Sequence[str], via: tuple[str, int] | Path | None, pidfile: Path | None
) -> str:
    """What SIPp's ``exec`` runs: hand the streams to a running sender (its FIFO, or
    its control port with ``--via``) or send them from a new process. SIPp passes the
    attribute to ``sh -c`` without unescaping XML entities, so the command must not
    need any (no quotes, no ``>``)."""
    if isinstance(via, Path):
        command = f"echo {' '.join(specs)} | tee -a {shlex.quote(str(via))}"
    else:
        args = [sys.executable, "-m", "agent.testcall.rtp"]
        for spec in specs:
            args += ["--to", spec]
        if via is not None:
            args += ["--via", f"{via[0]}:{via[1]}"]
        if pidfile is not None:
            args += ["--pidfile", str(pidfile)]
        command = " ".join(shlex.quote(a) for a in args)
    if any(c in command for c in '<>&"'):
        raise ValueError(f"command needs XML escaping, which SIPp would not undo: {command}")
    return command


# ---------------------------------------------------------------- scenario assembly


class _Scenario:
    """SIPp elements in order. SIPp numbers its messages (every element but labels);
    ``[branch-N]`` reuses the branch of the message N places back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.elements: list[str] = []
        self.messages = 0
        self.cseq = 1

    def add(self, element: str) -> int:
        self.elements.append(element)
        if "<label " not in element:
            self.messages += 1
        return self.messages - 1

    def send(self, message: str, retrans: bool = True) -> int:
        attr = ' retrans="500"' if retrans else ""
        return self.add(f"  <send{attr}>\n    <![CDATA[\n{message}\n    ]]>\n  </send>")

    def recv(self, what: str, *, optional: bool = False, nxt: str = "", action: str = "") -> int:
        attrs = what + (' optional="true"' if optional else "") + (f' next="{nxt}"' if nxt else "")
        if not action:
            return self.add(f"  <recv {attrs}/>")
        return self.add(f"  <recv {attrs}>\n    <action>{action}</action>\n  </recv>")

    def log(self, event: str) -> int:
        message = f"{event} [call_id] [timestamp]"
        return self.add(f'  <nop><action><log message="{message}"/></action></nop>')

    def pause(self, ms: int) -> int:
        return self.add(f'  <pause milliseconds="{max(0, ms)}"/>')

    def next_cseq(self) -> int:
        self.cseq += 1
        return self.cseq

    def render(self, references: str = "") -> str:
        return (
            '<?xml version="1.0" encoding="ISO-8859-1" ?>\n'
            f"<scenario name={quoteattr(self.name)}>\n"
            + "\n".join(self.elements)
            + (f'\n  <Reference variables="{references}"/>' if references else "")
            + "\n</scenario>\n"
        )


def _eregs(streams: int) -> str:
    """``streams`` audio ports of the 200's SDP → ``[$p1]``…, its first c= → ``[$ip]``
    (pjsua writes c= per m-line)."""
    regexp = " .*".join(["m=audio ([0-9]+)"] * streams) + " "
    assign = ",".join(["m", *(f"p{n}" for n in range(1, streams + 1))])
    return (
        '<ereg regexp="c=IN IP4 ([0-9.]+)" search_in="body" check_it="true" assign_to="c,ip"/>'
        f'<ereg regexp={quoteattr(regexp)} search_in="body" check_it="true"'
        f' assign_to="{assign}"/>'
        '<log message="answered [call_id] [timestamp]"/>'
    )


def _answered(sc: _Scenario, streams: int, refusal: bool) -> None:
    """The answer (or a refusal) to the INVITE at element 0, then the ACK."""
    for code in ("100", "180", "183"):
        sc.recv(f'response="{code}"', optional=True)
    if refusal:
        for code in ("486", "503"):
            stamp = f'<log message="refused [call_id] [timestamp] status={code}"/>'
            sc.recv(f'response="{code}"', optional=True, nxt="refused", action=stamp)
    sc.recv('response="200" rrs="true"', action=_eregs(streams))
    sc.send(_request("ACK", 1, None), retrans=False)


def _midcall(sc: _Scenario, call: SiprecCall, since_ack: int) -> int:
    """Mid-call requests in time order; returns the ms elapsed since the ACK."""
    version, current = 1, call.sdp_direction
    for step in sorted(call.midcall, key=lambda m: m.at_ms):
        sc.pause(step.at_ms - since_ack)
        since_ack = step.at_ms
        body = None
        if step.sdp_direction is not None and step.sdp_direction != current:
            version, current = version + 1, step.sdp_direction
        if step.sdp_direction is not None:
            sdp_text = sdp(call.rtp_ports, call.labels, step.sdp_direction, version)
            body = (
                _multipart(sdp_text, step.metadata, call)
                if step.metadata
                else ("application/sdp", sdp_text)
            )
        elif step.metadata:
            body = ("application/rs-metadata+xml", step.metadata)
        headers = ["Supported: timer", f"Session-Expires: {step.session_expires};refresher=uac"]
        cseq = sc.next_cseq()
        sc.send(_request(step.method, cseq, body, headers if step.session_expires else ()))
        sc.recv('response="100"', optional=True)
        sc.recv(f'response="{step.expect}"')
        if step.method == "INVITE":
            sc.send(_request("ACK", cseq, None), retrans=False)
    return since_ack


def _hangup(sc: _Scenario, call: SiprecCall, since_ack: int) -> None:
    if call.hangup == "srs":
        stamp = '<log message="bye_received [call_id] [timestamp]"/>'
        sc.recv('request="BYE"', action=stamp)
        sc.send(
            "SIP/2.0 200 OK\n[last_Via:]\n[last_From:]\n[last_To:]\n[last_Call-ID:]\n"
            "[last_CSeq:]\nContent-Length: 0\n",
            retrans=False,
        )
        return
    if call.call_ms_spread > 0:
        low = max(0, call.call_ms - since_ack)
        sc.add(f'  <pause distribution="uniform" min="{low}" max="{low + call.call_ms_spread}"/>')
    else:
        sc.pause(call.call_ms - since_ack)
    sc.log("bye")
    sc.send(_request("BYE", sc.next_cseq(), None))
    sc.recv('response="200" crlf="true"')


def siprec_scenario(call: SiprecCall) -> str:
    """A SIPREC call: two labelled streams, metadata, real speech, mid-call steps, BYE."""
    sdp_text = sdp(call.rtp_ports, call.labels, call.sdp_direction, 1)
    if call.with_metadata:
        content_type, body = _multipart(sdp_text, call.metadata_document(), call)
    else:
        content_type, body = "application/sdp", sdp_text
    headers = ["Require: siprec", "Supported: siprec" + (", timer" if call.session_expires else "")]
    headers += call.extra_headers
    if call.session_expires:
        headers.append(f"Session-Expires: {call.session_expires};refresher=uac")
    sc = _Scenario("siprec")
    sc.send(_invite(content_type, body, headers))
    _answered(sc, 2, call.accept_refusal)
    wav = {call.customer_label: call.customer_wav, call.employee_label: call.employee_wav}
    specs = [
        f"[$ip]:[$p{n}]={wav[label]}" + (f",src={port}" if call.rtp_bind else "")
        for n, (label, port) in enumerate(zip(call.labels, call.rtp_ports, strict=True), 1)
    ]
    command = rtp_command(specs, call.rtp_via, call.rtp_pidfile)
    sc.add(f"  <nop><action><exec command={quoteattr(command)}/></action></nop>")
    _hangup(sc, call, _midcall(sc, call, 0))
    if call.accept_refusal:
        sc.add('  <nop next="end"/>')
        sc.add('  <label id="refused"/>')
        sc.send(_hop_ack(sc.messages), retrans=False)
        sc.add('  <label id="end"/>')
    return sc.render("c,m")


def refused_scenario(call: SiprecCall, status: int, plain: bool = False) -> str:
    """An INVITE the recorder must refuse with ``status`` (then the hop-by-hop ACK);
    ``plain``: a plain INVITE with one stream and ``X-Callrec-*`` headers instead."""
    sdp_text = sdp(call.rtp_ports, call.labels, call.sdp_direction, 1)
    if plain:
        content_type, body = "application/sdp", sdp(call.rtp_ports[:1], [None], "sendonly", 1)
        headers = [
            "X-Callrec-Customer: <sip:0401234567@pbx.example>",
            "X-Callrec-Employee: <sip:1001@pbx.example>",
        ]
    else:
        content_type, body = _multipart(sdp_text, call.metadata_document(), call)
        headers = ["Require: siprec", "Supported: siprec"]
    sc = _Scenario("refused")
    sc.send(_invite(content_type, body, headers))
    sc.recv('response="100"', optional=True)
    stamp = f'<log message="refused [call_id] [timestamp] status={status}"/>'
    sc.recv(f'response="{status}"', action=stamp)
    sc.send(_hop_ack(sc.messages), retrans=False)
    return sc.render()


def cancel_scenario(call: SiprecCall, cancel_after_ms: int) -> str:
    """The SRC gives up ``cancel_after_ms`` after the INVITE's 100 Trying (from a proxy:
    the front sends it at once): CANCEL, 487, ACK."""
    sdp_text = sdp(call.rtp_ports, call.labels, call.sdp_direction, 1)
    content_type, body = _multipart(sdp_text, call.metadata_document(), call)
    sc = _Scenario("siprec-cancel")
    sc.send(_invite(content_type, body, ["Require: siprec", "Supported: siprec"]))
    sc.recv('response="100"')  # SIPp has no optional receive before a pause
    sc.pause(cancel_after_ms)
    sc.log("cancelled")
    cancel = (
        _hop_ack(sc.messages)
        .replace("ACK sip:", "CANCEL sip:")
        .replace("1 ACK", "1 CANCEL")
        .replace("[last_To:]", "To: <sip:srs@[remote_ip]:[remote_port]>")
    )
    sc.send(cancel)
    sc.recv('response="200"')
    sc.recv('response="487"')
    sc.send(_hop_ack(sc.messages), retrans=False)
    return sc.render()


def plain_scenario(
    wav: Path,
    headers: dict[str, str],
    call_ms: int = 5000,
    rtp_port: int | None = None,
    rtp_via: tuple[str, int] | Path | None = None,
) -> str:
    """A plain INVITE with one sendonly stream; parties in headers."""
    port = rtp_port or free_port()
    invite = _invite(
        "application/sdp",
        sdp([port], [None], "sendonly", 1),
        [f"{k}: {v}" for k, v in headers.items()],
    )
    sc = _Scenario("plain")
    sc.send(invite)
    _answered(sc, 1, refusal=False)
    command = rtp_command([f"[$ip]:[$p1]={wav},src={port}"], rtp_via, None)
    sc.add(f"  <nop><action><exec command={quoteattr(command)}/></action></nop>")
    sc.pause(call_ms)
    sc.log("bye")
    sc.send(_request("BYE", sc.next_cseq(), None))
    sc.recv('response="200" crlf="true"')
    return sc.render("c,m")
