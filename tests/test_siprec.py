"""Reading SIPREC INVITEs and RFC 7865 metadata: pure functions, no network."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.recorder.siprec import (
    MetadataError,
    SipParseError,
    audio_streams,
    parse_invite,
    parse_metadata,
    parse_sdp,
)

NS = "urn:ietf:params:xml:ns:recording:1"
CUSTOMER = "+358401234567"

SDP = """v=0
o=- 1 1 IN IP4 192.0.2.1
s=-
c=IN IP4 192.0.2.1
t=0 0
m=audio 40000 RTP/AVP 8
a=rtpmap:8 PCMA/8000
a=label:96
a=sendonly
m=audio 40002 RTP/AVP 8
a=rtpmap:8 PCMA/8000
a=label:97
a=sendonly
"""

# RFC 7865 §8-style document: participantstreamassoc carries the send relation.
METADATA = f"""<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="{NS}">
  <datamode>complete</datamode>
  <session session_id="hVpd7YQgRW2nD22h7q60JQ=="/>
  <participant participant_id="srfBElmCRp2QB23b7Mpk0w==">
    <nameID aor="sip:{CUSTOMER}@pbx.example;user=phone">
      <name xml:lang="fi">Asiakas</name>
    </nameID>
  </participant>
  <participant participant_id="zSfPoSvdSDCmU3A3TRDxAw==">
    <nameID aor="sip:1001@pbx.example"><name>Aino Virtanen</name></nameID>
    <nameID aor="sip:aino@pbx.example"/>
  </participant>
  <stream stream_id="UAAMm5GRQKSCMVvLyl4rFw==" session_id="hVpd7YQgRW2nD22h7q60JQ==">
    <label>96</label>
  </stream>
  <stream stream_id="i1Pz3to5hGk8fuXl+PbwCw==" session_id="hVpd7YQgRW2nD22h7q60JQ==">
    <label>97</label>
  </stream>
  <participantstreamassoc participant_id="srfBElmCRp2QB23b7Mpk0w==">
    <send>UAAMm5GRQKSCMVvLyl4rFw==</send>
    <recv>i1Pz3to5hGk8fuXl+PbwCw==</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="zSfPoSvdSDCmU3A3TRDxAw==">
    <send>i1Pz3to5hGk8fuXl+PbwCw==</send>
  </participantstreamassoc>
</recording>
"""

# The older draft shape (Acme/Oracle SBCs): id attributes, <aor>, <send> in <participant>.
DRAFT_METADATA = """<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns='urn:ietf:params:xml:ns:recording'>
  <datamode>complete</datamode>
  <participant id="p1" session="s1">
    <aor>sip:1001@pbx.example</aor>
    <name>Aino</name>
    <send>st2</send>
  </participant>
  <participant id="p2" session="s1">
    <nameID aor="tel:+358-40-123-4567"/>
    <send>st1</send>
  </participant>
  <stream id="st1" session="s1"><label>1</label></stream>
  <stream id="st2" session="s1"><label>2</label></stream>
</recording>
"""


def crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def invite(
    body: str,
    content_type: str,
    extra: str = "Require: siprec\n",
    headers: str = "",
) -> str:
    head = (
        "INVITE sip:srs@192.0.2.10:5070 SIP/2.0\n"
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-1\n"
        "From: <sip:src@192.0.2.1>;tag=1\n"
        "To: <sip:srs@192.0.2.10>\n"
        "Call-ID: abc-123@192.0.2.1\n"
        "CSeq: 1 INVITE\n"
        f"{extra}{headers}"
        f"Content-Type: {content_type}\n"
        f"Content-Length: {len(body)}\n"
    )
    return crlf(head + "\n" + body)


def multipart(*parts: tuple[str, str], boundary: str = "OSS-unique-boundary-42") -> str:
    chunks = [f"--{boundary}\n{headers}\n{content}" for headers, content in parts]
    return "preamble is ignored\n" + "".join(chunks) + f"--{boundary}--\nepilogue\n"


SDP_PART = ("Content-Type: application/sdp\n", SDP)
META_PART = (
    "Content-Type: application/rs-metadata+xml\nContent-Disposition: recording-session\n",
    METADATA,
)


# ---------------------------------------------------------------- the INVITE


@pytest.mark.parametrize("parts", [(SDP_PART, META_PART), (META_PART, SDP_PART)])
def test_multipart_gives_sdp_and_metadata_in_either_order(
    parts: tuple[tuple[str, str], ...],
) -> None:
    raw = invite(multipart(*parts), 'multipart/mixed;boundary="OSS-unique-boundary-42"')
    parsed = parse_invite(raw)
    assert parsed.method == "INVITE"
    assert parsed.call_id == "abc-123@192.0.2.1"
    assert parsed.siprec
    assert parsed.sdp is not None and parsed.sdp.startswith("v=0")
    assert parsed.metadata is not None and "<recording" in parsed.metadata
    assert parsed.metadata.rstrip().endswith("</recording>")
    assert [m.label for m in parse_sdp(parsed.sdp)] == ["96", "97"]


def test_metadata_part_without_content_disposition_and_lf_line_ends() -> None:
    meta = ("Content-Type: application/rs-metadata+xml\n", METADATA)
    body = multipart(SDP_PART, meta, boundary="b1")
    raw = invite(body, "multipart/mixed; boundary=b1").replace("\r\n", "\n")
    parsed = parse_invite(raw)
    assert parsed.sdp is not None and "m=audio 40002" in parsed.sdp
    assert parse_metadata(parsed.metadata).participants[0].participant_id


def test_bytes_input_and_compact_headers_and_folding() -> None:
    raw = (
        "INVITE sip:srs@192.0.2.10 SIP/2.0\r\n"
        "i: compact-id\r\n"
        "f: <sip:src@192.0.2.1>;tag=1\r\n"
        "t: <sip:srs@192.0.2.10>\r\n"
        "X-Callrec-Customer: <sip:+358401234567@pbx.example>\r\n"
        "Supported: timer,\r\n  siprec\r\n"
        "c: application/sdp\r\n"
        "\r\n" + crlf(SDP)
    ).encode()
    parsed = parse_invite(raw)
    assert parsed.call_id == "compact-id"
    assert parsed.from_.startswith("<sip:src@")
    assert parsed.header("x-callrec-customer") == "<sip:+358401234567@pbx.example>"
    assert parsed.siprec  # via the folded Supported header
    assert parsed.metadata is None
    assert parsed.sdp is not None and len(parse_sdp(parsed.sdp)) == 2


def test_plain_invite_is_not_siprec() -> None:
    parsed = parse_invite(invite(SDP, "application/sdp", extra=""))
    assert not parsed.siprec
    assert parsed.metadata is None


def test_repr_never_shows_the_parties() -> None:
    raw = invite(multipart(SDP_PART, META_PART), "multipart/mixed;boundary=OSS-unique-boundary-42")
    parsed = parse_invite(raw)
    metadata = parse_metadata(parsed.metadata)
    for text in (repr(parsed), repr(metadata)):
        assert CUSTOMER not in text
        assert "401234567" not in text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "request line"),
        ("garbage\r\n\r\n", "request line"),
        ("SIP/2.0 200 OK\r\nCall-ID: x\r\n\r\n", "request line"),
        ("INVITE sip:a@b SIP/2.0\r\nFrom: <sip:x@y>\r\n\r\n", "Call-ID"),
    ],
)
def test_unreadable_requests_are_sip_parse_errors(raw: str, message: str) -> None:
    with pytest.raises(SipParseError, match=message):
        parse_invite(raw)


def test_multipart_without_boundary_parameter() -> None:
    with pytest.raises(SipParseError, match="boundary"):
        parse_invite(invite(multipart(SDP_PART), "multipart/mixed"))


def test_multipart_whose_boundary_is_missing_from_the_body() -> None:
    with pytest.raises(SipParseError, match="boundary"):
        parse_invite(invite(multipart(SDP_PART, boundary="x"), "multipart/mixed;boundary=y"))


def test_multipart_with_only_a_close_delimiter_has_no_parts() -> None:
    with pytest.raises(SipParseError, match="no parts"):
        parse_invite(invite("--b--\r\n", "multipart/mixed;boundary=b"))


def test_part_without_headers_is_text_plain_and_ignored() -> None:
    raw = invite(multipart(("", "hello"), SDP_PART, boundary="b"), "multipart/mixed;boundary=b")
    parsed = parse_invite(raw)
    assert parsed.sdp is not None and parsed.metadata is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_is_parsed_or_refused_with_sip_parse_error(text: str) -> None:
    for raw in (text, "INVITE sip:a@b SIP/2.0\r\nCall-ID: x\r\n" + text):
        try:
            parsed = parse_invite(raw)
        except SipParseError:
            continue
        if parsed.sdp is not None:
            with contextlib.suppress(SipParseError):
                parse_sdp(parsed.sdp)


# ---------------------------------------------------------------- SDP


def test_sdp_media_lines_in_order_with_labels_and_direction() -> None:
    sdp = (
        "v=0\r\nc=IN IP4 192.0.2.1\r\na=recvonly\r\n"
        "m=audio 4000 RTP/AVP 0\r\na=label:1\r\n"
        "m=video 0 RTP/AVP 96\r\n"
        "m=audio 4002/2 RTP/AVP 0\r\na=inactive\r\na=label: two \r\n"
        "m=audio 0 RTP/AVP 0\r\n"
    )
    media = parse_sdp(sdp)
    assert [(m.index, m.kind, m.port, m.label, m.direction) for m in media] == [
        (0, "audio", 4000, "1", "recvonly"),
        (1, "video", 0, None, "recvonly"),
        (2, "audio", 4002, "two", "inactive"),
        (3, "audio", 0, None, "recvonly"),
    ]
    assert [m.index for m in audio_streams(media)] == [0, 2]


def test_sdp_without_media_and_default_direction() -> None:
    assert parse_sdp("v=0\r\n") == ()
    assert parse_sdp("m=audio 1 RTP/AVP 0")[0].direction == "sendrecv"


@pytest.mark.parametrize("line", ["m=audio", "m=audio x RTP/AVP 0", "m=audio 1"])
def test_malformed_m_line(line: str) -> None:
    with pytest.raises(SipParseError, match="m-line #1"):
        parse_sdp(f"v=0\r\n{line}\r\n")


# ---------------------------------------------------------------- metadata


def test_rfc7865_participants_streams_and_associations() -> None:
    metadata = parse_metadata(METADATA)
    customer, employee = metadata.participants
    assert customer.aors == (f"sip:{CUSTOMER}@pbx.example;user=phone",)
    assert customer.name == "Asiakas"
    assert customer.sends == ("UAAMm5GRQKSCMVvLyl4rFw==",)
    assert employee.aors == ("sip:1001@pbx.example", "sip:aino@pbx.example")
    assert employee.name == "Aino Virtanen"
    assert employee.sends == ("i1Pz3to5hGk8fuXl+PbwCw==",)
    assert [(s.stream_id, s.label) for s in metadata.streams] == [
        ("UAAMm5GRQKSCMVvLyl4rFw==", "96"),
        ("i1Pz3to5hGk8fuXl+PbwCw==", "97"),
    ]
    assert metadata.label_of("i1Pz3to5hGk8fuXl+PbwCw==") == "97"
    assert metadata.label_of("nope") is None


def test_draft_namespace_with_send_inside_participant() -> None:
    metadata = parse_metadata(DRAFT_METADATA.encode())
    employee, customer = metadata.participants
    assert employee.participant_id == "p1"
    assert employee.aors == ("sip:1001@pbx.example",)
    assert employee.name == "Aino"
    assert employee.sends == ("st2",)
    assert customer.aors == ("tel:+358-40-123-4567",)
    assert customer.sends == ("st1",)
    assert [(s.stream_id, s.label) for s in metadata.streams] == [("st1", "1"), ("st2", "2")]


def test_participant_without_name_id_is_kept() -> None:
    xml = f'<recording xmlns="{NS}"><participant participant_id="a"/></recording>'
    (participant,) = parse_metadata(xml).participants
    assert participant.aors == () and participant.name is None and participant.sends == ()


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (None, "no application/rs-metadata"),
        ("", "no application/rs-metadata"),
        ("   \r\n", "no application/rs-metadata"),
        ("<recording xmlns=", "not well-formed"),
        (f'<?xml version="1.0" encoding="x-unknown"?><recording xmlns="{NS}"/>', "encoding"),
        (f'<?xml version="1.0" encoding="EBCDIC"?><recording xmlns="{NS}"/>', "encoding"),
        (f'<?xml version="1.0" encoding="utf-7"?><recording xmlns="{NS}"/>', "encoding"),
        (f'<recording xmlns="{NS}"><participant participant_id="a">', "not well-formed"),
        ("<?xml version='1.0'?><html/>", "expected <recording>"),
        ("<recording/>", "expected <recording>"),
        ('<recording xmlns="urn:example:other"/>', "expected <recording>"),
        (f'<recording xmlns="{NS}"><datamode>complete</datamode></recording>', "no participant"),
        (f'<recording xmlns="{NS}"><participant/></recording>', "participant #1"),
        (
            f'<recording xmlns="{NS}"><participant participant_id="a"/><stream/></recording>',
            "stream #1",
        ),
        (
            f'<recording xmlns="{NS}"><participant participant_id="a"/>'
            '<participantstreamassoc participant_id="b"><send>s</send>'
            "</participantstreamassoc></recording>",
            "unknown participant",
        ),
        ("x" * 300_000, "larger than"),
    ],
)
def test_bad_metadata_is_a_metadata_error(xml: str | None, message: str) -> None:
    with pytest.raises(MetadataError, match=message):
        parse_metadata(xml)


def test_entity_expansion_is_refused() -> None:
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        f'<recording xmlns="{NS}"><participant participant_id="&b;"/></recording>'
    )
    with pytest.raises(MetadataError, match="forbidden"):
        parse_metadata(bomb)


def test_external_entity_is_refused() -> None:
    xxe = (
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        f'<recording xmlns="{NS}"><participant participant_id="&x;"/></recording>'
    )
    with pytest.raises(MetadataError, match="forbidden"):
        parse_metadata(xxe)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_metadata_is_read_or_refused_with_metadata_error(text: str) -> None:
    for xml in (text, f'<recording xmlns="{NS}">{text}</recording>'):
        with contextlib.suppress(MetadataError):
            parse_metadata(xml)
