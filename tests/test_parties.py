"""Who is who on a recorded call and which stream is whose: pure functions."""

from __future__ import annotations

import pytest

from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    MIXED_LEG,
    CaptureMeta,
    Direction,
    Flag,
    parse_iso,
)
from agent.config import SipClient
from agent.directory import Directory
from agent.privacy import NumberKind, Protector
from agent.recorder.parties import (
    CallParties,
    CallPlan,
    PartyHeaders,
    PartyRules,
    classify,
    classify_headers,
    header_direction,
    plan_call,
    unclassified,
)
from agent.recorder.party_updates import apply_update, read_update
from agent.recorder.session import new_meta
from agent.recorder.siprec import SdpMedia, parse_metadata
from agent.testcall.sipp import Party, metadata_xml
from tests.support.stack import make_keys

SERVICE = "sip:+358201234567@pbx.example"
CUSTOMER = "sip:+358401234567@pbx.example;user=phone"
EMPLOYEE = "sip:1001@pbx.example"
HEADERS = PartyHeaders("X-Callrec-Customer", "X-Callrec-Employee", "X-Callrec-Service")

DIRECTORY = Directory.from_dict(
    {
        "person": [
            {
                "id": "e1001",
                "name": "Aino Virtanen",
                "role": "agent",
                "team": "parcels",
                "aors": ["sip:1001@pbx.example", "1001"],
            },
            {"id": "e1002", "name": "Mikko Korhonen", "role": "agent", "aors": ["sip:1002@x"]},
        ]
    }
)

AUDIO = (
    SdpMedia(0, "audio", 40000, "1", "sendonly"),
    SdpMedia(1, "audio", 40002, "2", "sendonly"),
)


@pytest.fixture(scope="module")
def protector(tmp_path_factory: pytest.TempPathFactory) -> Protector:
    return make_keys(tmp_path_factory.mktemp("keys")).protector()


@pytest.fixture(scope="module")
def rules(protector: Protector) -> PartyRules:
    return PartyRules.build(protector, ["020 123 4567", "+358 9 876 5432"])


def run(rules: PartyRules, *parties: Party, audio: tuple[SdpMedia, ...] = AUDIO) -> CallParties:
    return classify(parse_metadata(metadata_xml(parties)), audio, DIRECTORY, rules)


def customer(aor: str | None = CUSTOMER, sends: str | None = "1") -> Party:
    return Party("c", aor, None, sends)


def employee(aor: str | None = EMPLOYEE, sends: str | None = "2") -> Party:
    return Party("e", aor, "Aino", sends)


def service(aor: str | None = SERVICE) -> Party:
    return Party("s", aor)


def test_inbound_call(rules: PartyRules) -> None:
    parties = run(rules, customer(), service(), employee())
    assert parties.direction is Direction.INBOUND
    assert parties.customer.kind is NumberKind.NUMBER
    assert parties.customer.masked == "+358401234***"
    assert parties.customer.tail_sealed
    assert [(e.id, e.name, e.aor, e.team) for e in parties.employees] == [
        ("e1001", "Aino Virtanen", EMPLOYEE, "parcels")
    ]
    assert parties.service_number == "+358201234567"
    assert (parties.customer_stream, parties.employee_stream) == (0, 1)
    assert parties.flags == ()


def test_outbound_call_employee_first(rules: PartyRules) -> None:
    parties = run(rules, employee(), service(), customer())
    assert parties.direction is Direction.OUTBOUND
    assert parties.customer.masked == "+358401234***"


def test_outbound_call_service_line_first(rules: PartyRules) -> None:
    assert run(rules, service(), customer(), employee()).direction is Direction.OUTBOUND


@pytest.mark.parametrize(
    "aor",
    [
        "sip:0401234567@pbx.example;user=phone",
        "tel:+358-40-123-4567",
        "sip:00358401234567@pbx.example",
        '"Asiakas" <sip:+358401234567@pbx.example>',
    ],
)
def test_customer_number_formats(rules: PartyRules, aor: str) -> None:
    assert run(rules, customer(aor), employee()).customer.masked == "+358401234***"


def test_full_number_is_not_in_the_result(rules: PartyRules) -> None:
    parties = run(rules, customer(), service(), employee())
    assert "401234567" not in repr(parties)


def test_streams_follow_the_metadata_not_the_m_line_order(rules: PartyRules) -> None:
    parties = run(rules, customer(sends="2"), employee(sends="1"))
    assert (parties.customer_stream, parties.employee_stream) == (1, 0)


def test_streams_fall_back_to_m_line_order_without_associations(rules: PartyRules) -> None:
    parties = run(rules, employee(sends=None), customer(sends=None))
    assert (parties.customer_stream, parties.employee_stream) == (0, 1)


def test_one_known_association_fixes_the_other_leg(rules: PartyRules) -> None:
    only_employee = run(rules, customer(sends=None), employee(sends="1"))
    assert (only_employee.customer_stream, only_employee.employee_stream) == (1, 0)
    only_customer = run(rules, customer(sends="2"), employee(sends=None))
    assert (only_customer.customer_stream, only_customer.employee_stream) == (1, 0)


def test_label_missing_from_sdp_falls_back(rules: PartyRules) -> None:
    parties = run(rules, customer(sends="9"), employee(sends="8"))
    assert (parties.customer_stream, parties.employee_stream) == (0, 1)


def test_service_line_stream_is_the_employee_leg_when_no_employee_sends(
    rules: PartyRules,
) -> None:
    parties = run(rules, customer(sends="2"), Party("s", SERVICE, None, "1"), employee(sends=None))
    assert (parties.customer_stream, parties.employee_stream) == (1, 0)


def test_withheld_customer(rules: PartyRules) -> None:
    parties = run(rules, customer("sip:anonymous@anonymous.invalid"), service(), employee())
    assert parties.customer.kind is NumberKind.ANONYMOUS
    assert parties.customer.masked == "anonymous"
    assert parties.customer.tail_sealed is None
    assert parties.flags == (Flag.CUSTOMER_WITHHELD,)
    assert parties.direction is Direction.INBOUND
    assert parties.customer_stream == 0


def test_unknown_extension_is_an_unknown_employee(rules: PartyRules) -> None:
    parties = run(rules, customer(), service(), employee("sip:1099@pbx.example"))
    assert [(e.id, e.name, e.aor) for e in parties.employees] == [
        ("unknown", "unknown", "sip:1099@pbx.example")
    ]
    assert parties.flags == (Flag.EMPLOYEE_UNKNOWN,)
    assert (parties.customer_stream, parties.employee_stream) == (0, 1)


def test_unknown_identity_with_a_long_digit_run_is_redacted(rules: PartyRules) -> None:
    parties = run(rules, customer(), employee("sip:agent-99912345678901@pbx.example"))
    assert "99912345678901" not in parties.employees[0].aor


def test_employee_matched_by_bare_extension_on_another_host(rules: PartyRules) -> None:
    parties = run(rules, customer(), employee("sip:1001@10.0.0.5:5060"))
    assert parties.employees[0].id == "e1001"


def test_employee_matched_by_a_second_name_id(rules: PartyRules) -> None:
    xml = metadata_xml([customer(), employee("sip:agent-x@pbx.example")]).replace(
        '<nameID aor="sip:agent-x@pbx.example">',
        '<nameID aor="sip:agent-x@pbx.example"></nameID><nameID aor="sip:1001@pbx.example">',
    )
    parties = classify(parse_metadata(xml), AUDIO, DIRECTORY, rules)
    assert parties.employees[0].id == "e1001"


def test_two_employees_are_both_tagged(rules: PartyRules) -> None:
    parties = run(rules, customer(), employee(), Party("e2", "sip:1002@x"))
    assert [e.id for e in parties.employees] == ["e1001", "e1002"]


def test_no_service_number(rules: PartyRules) -> None:
    parties = run(rules, customer(), employee())
    assert parties.service_number is None
    assert parties.flags == (Flag.SERVICE_UNKNOWN,)


def test_service_number_in_national_format(rules: PartyRules) -> None:
    parties = run(rules, customer(), service("sip:098765432@pbx.example"), employee())
    assert parties.service_number == "+35898765432"


def test_no_customer(rules: PartyRules) -> None:
    parties = run(rules, service(), employee())
    assert parties.customer.kind is NumberKind.UNKNOWN
    assert Flag.CUSTOMER_UNKNOWN in parties.flags


def test_participants_without_aor_do_not_decide_direction(rules: PartyRules) -> None:
    parties = run(rules, Party("x", None), customer(), employee())
    assert parties.direction is Direction.INBOUND


def test_nobody_known_gives_unknown_direction(rules: PartyRules) -> None:
    parties = run(rules, Party("x", None))
    assert parties.direction is Direction.UNKNOWN
    assert set(parties.flags) == {
        Flag.CUSTOMER_UNKNOWN,
        Flag.EMPLOYEE_UNKNOWN,
        Flag.SERVICE_UNKNOWN,
    }


def test_bad_service_number_in_config(protector: Protector) -> None:
    with pytest.raises(ValueError, match="'customer service'"):
        PartyRules.build(protector, ["customer service"])


def test_unclassified_call_keeps_m_line_order() -> None:
    parties = unclassified(AUDIO, Flag.METADATA_INVALID)
    assert parties.flags[0] is Flag.METADATA_INVALID
    assert (parties.customer_stream, parties.employee_stream) == (0, 1)
    assert parties.employees[0].id == "unknown"


def test_plain_call_from_headers(rules: PartyRules) -> None:
    parties = classify_headers(
        "<sip:0401234567@pbx>", "1001", "tel:+358201234567", DIRECTORY, rules
    )
    assert parties.customer.masked == "+358401234***"
    assert parties.employees[0].name == "Aino Virtanen"
    assert parties.service_number == "+358201234567"
    assert parties.direction is Direction.UNKNOWN
    assert parties.flags == ()


def test_plain_call_without_headers(rules: PartyRules) -> None:
    parties = classify_headers(None, None, None, DIRECTORY, rules)
    assert set(parties.flags) == {
        Flag.CUSTOMER_UNKNOWN,
        Flag.EMPLOYEE_UNKNOWN,
        Flag.SERVICE_UNKNOWN,
    }


# ---------------------------------------------------------------- whole INVITEs

SDP_TWO = (
    "v=0\r\nc=IN IP4 192.0.2.1\r\n"
    "m=audio 40000 RTP/AVP 8\r\na=label:1\r\na=sendonly\r\n"
    "m=audio 40002 RTP/AVP 8\r\na=label:2\r\na=sendonly\r\n"
)
SDP_ONE = "v=0\r\nc=IN IP4 192.0.2.1\r\nm=audio 40000 RTP/AVP 8\r\na=sendonly\r\n"


def raw_invite(body: str, content_type: str, headers: str = "Require: siprec\r\n") -> str:
    return (
        "INVITE sip:srs@192.0.2.10 SIP/2.0\r\nCall-ID: c1\r\n"
        f"{headers}Content-Type: {content_type}\r\n\r\n{body}"
    )


def siprec_invite(metadata: str) -> str:
    body = (
        "--b\r\nContent-Type: application/sdp\r\n\r\n" + SDP_TWO + "\r\n"
        "--b\r\nContent-Type: application/rs-metadata+xml\r\n\r\n" + metadata + "\r\n--b--\r\n"
    )
    return raw_invite(body, "multipart/mixed;boundary=b")


def test_plan_for_a_siprec_invite(rules: PartyRules) -> None:
    xml = metadata_xml([customer(sends="2"), service(), employee(sends="1")])
    plan = plan_call(siprec_invite(xml), DIRECTORY, rules, HEADERS, offered_audio=2)
    assert plan.source == "siprec"
    assert plan.problem is None
    assert plan.audio_count == 2
    assert dict(plan.legs) == {1: CUSTOMER_LEG, 0: EMPLOYEE_LEG}
    assert plan.parties.customer.masked == "+358401234***"


def test_plan_with_malformed_metadata_still_records(rules: PartyRules) -> None:
    plan = plan_call(siprec_invite("<recording"), DIRECTORY, rules, HEADERS, offered_audio=2)
    assert plan.source == "siprec"
    assert plan.problem is not None and "not well-formed" in plan.problem
    assert Flag.METADATA_INVALID in plan.parties.flags
    assert dict(plan.legs) == {0: CUSTOMER_LEG, 1: EMPLOYEE_LEG}


def test_plan_without_metadata_still_records(rules: PartyRules) -> None:
    plan = plan_call(raw_invite(SDP_TWO, "application/sdp"), DIRECTORY, rules, HEADERS, 2)
    assert plan.problem is not None and "no application/rs-metadata+xml" in plan.problem
    assert Flag.METADATA_MISSING in plan.parties.flags
    assert Flag.METADATA_INVALID not in plan.parties.flags
    assert len(plan.legs) == 2


def test_plan_for_an_unreadable_body_uses_pjsuas_stream_count(rules: PartyRules) -> None:
    raw = raw_invite(SDP_TWO, "multipart/mixed")  # no boundary: we cannot split it
    plan = plan_call(raw, DIRECTORY, rules, HEADERS, offered_audio=2)
    assert plan.problem is not None and "boundary" in plan.problem
    assert plan.audio_count == 2
    assert dict(plan.legs) == {0: CUSTOMER_LEG, 1: EMPLOYEE_LEG}


def test_plan_for_a_plain_invite(rules: PartyRules) -> None:
    headers = (
        "X-Callrec-Customer: <sip:+358401234567@pbx>\r\n"
        "X-Callrec-Employee: sip:1001@pbx.example\r\n"
        "X-Callrec-Service: +358201234567\r\n"
    )
    raw = raw_invite(SDP_ONE, "application/sdp", headers)
    plan = plan_call(raw, DIRECTORY, rules, HEADERS, offered_audio=1)
    assert plan.source == "plain"
    assert dict(plan.legs) == {0: MIXED_LEG}
    assert plan.parties.customer.masked == "+358401234***"
    assert plan.parties.employees[0].id == "e1001"
    assert plan.parties.service_number == "+358201234567"


def test_plan_without_audio_has_no_legs(rules: PartyRules) -> None:
    raw = raw_invite("v=0\r\nm=video 4000 RTP/AVP 96\r\n", "application/sdp", headers="")
    assert plan_call(raw, DIRECTORY, rules, HEADERS, offered_audio=0).legs == {}


def test_plan_never_raises_on_garbage(rules: PartyRules) -> None:
    for raw in ("", "\x00\xff", "INVITE x SIP/2.0\r\n\r\n", b"\xff\xfe"):
        plan = plan_call(raw, DIRECTORY, rules, HEADERS, offered_audio=2)
        assert Flag.METADATA_INVALID in plan.parties.flags


# ---------------------------------------------------------------- what real SRCs send


@pytest.mark.parametrize(
    ("labels", "customer_label"),
    [(("0", "1"), "0"), (("1", "2"), "2"), (("caller", "agent"), "caller"), (("b", "a"), "a")],
)
def test_labels_as_numbers_from_zero_or_one_or_words(
    rules: PartyRules, labels: tuple[str, str], customer_label: str
) -> None:
    audio = tuple(
        SdpMedia(i, "audio", 40000 + 2 * i, label, "sendonly") for i, label in enumerate(labels)
    )
    other = labels[1] if customer_label == labels[0] else labels[0]
    parties = run(rules, customer(sends=customer_label), employee(sends=other), audio=audio)
    index = labels.index(customer_label)
    assert (parties.customer_stream, parties.employee_stream) == (index, 1 - index)


@pytest.mark.parametrize(
    "aor",
    [
        "sips:+358401234567@pbx.example",
        "tel:+358-40-123-4567",
        '"Asiakas" <sip:0401234567@pbx.example>',
        "<sips:+358401234567@pbx.example;user=phone>",
    ],
)
def test_customer_uris_with_and_without_display_names(rules: PartyRules, aor: str) -> None:
    parties = run(rules, customer(aor), service(), employee('"Aino" <sip:1001@pbx.example>'))
    assert parties.customer.masked == "+358401234***"
    assert [e.id for e in parties.employees] == ["e1001"]
    assert parties.flags == ()


def test_send_inside_participant_in_the_draft_namespace(rules: PartyRules) -> None:
    xml = metadata_xml(
        [employee(sends="1"), service(), customer(sends="2")],
        namespace="urn:ietf:params:xml:ns:recording",
        inline_send=True,
    )
    parties = classify(parse_metadata(xml), AUDIO, DIRECTORY, rules)
    assert (parties.customer_stream, parties.employee_stream) == (1, 0)
    assert parties.direction is Direction.OUTBOUND


# ---------------------------------------------------------------- plain INVITE direction


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("inbound", Direction.INBOUND),
        ("Outbound", Direction.OUTBOUND),
        ("in", Direction.INBOUND),
        ("outgoing;x=1", Direction.OUTBOUND),
        ("sideways", Direction.UNKNOWN),
        (None, Direction.UNKNOWN),
    ],
)
def test_direction_header(value: str | None, expected: Direction) -> None:
    assert header_direction(value) is expected


def test_plan_for_a_plain_invite_takes_its_direction_from_a_header(rules: PartyRules) -> None:
    headers = (
        "X-Callrec-Customer: <sip:+358401234567@pbx>\r\n"
        "X-Callrec-Employee: sip:1001@pbx.example\r\n"
        "X-Callrec-Direction: outbound\r\n"
    )
    plan = plan_call(raw_invite(SDP_ONE, "application/sdp", headers), DIRECTORY, rules, HEADERS, 1)
    assert plan.parties.direction is Direction.OUTBOUND


# ---------------------------------------------------------------- mid-call updates

STARTED = "2026-01-05T10:00:00.000Z"
LATER = "2026-01-05T10:01:30.000Z"


def reinvite(metadata: str | None) -> str:
    if metadata is None:
        return raw_invite(SDP_TWO, "application/sdp", headers="")
    return siprec_invite(metadata)


def answered(plan_parties: CallParties) -> CaptureMeta:
    plan = CallPlan("siprec", plan_parties, {0: CUSTOMER_LEG, 1: EMPLOYEE_LEG}, 2)
    return new_meta("hel-1", "a" * 32, "ref", plan, parse_iso(STARTED))


def test_an_update_without_metadata_is_nothing_to_merge(rules: PartyRules) -> None:
    assert read_update(reinvite(None), DIRECTORY, rules) == (None, None)


def test_an_update_with_broken_metadata_says_why(rules: PartyRules) -> None:
    parties, problem = read_update(reinvite("<recording"), DIRECTORY, rules)
    assert parties is None and problem is not None and "not well-formed" in problem


def test_transfer_adds_the_new_employee_with_the_time_they_joined(rules: PartyRules) -> None:
    meta = answered(run(rules, customer(), service(), employee()))
    xml = metadata_xml([customer(), Party("e2", "sip:1002@x", "Mikko", "2")])
    update, problem = read_update(reinvite(xml), DIRECTORY, rules)
    assert problem is None and update is not None
    merged = apply_update(meta, update, LATER)
    assert [(e.id, e.joined_at) for e in merged.employees] == [("e1001", STARTED), ("e1002", LATER)]
    assert merged.customer == meta.customer and merged.flags == meta.flags
    assert apply_update(merged, update, "2026-01-05T10:02:00.000Z") == merged  # idempotent


def test_update_never_replaces_what_is_known(rules: PartyRules) -> None:
    meta = answered(run(rules, customer(), service(), employee()))
    other = run(rules, customer("sip:+358501112223@pbx"), employee("sip:1002@x"))
    merged = apply_update(meta, other, LATER)
    assert merged.customer == meta.customer
    assert merged.service_number == meta.service_number
    assert merged.direction is meta.direction


def test_late_metadata_fills_in_a_call_that_had_none(rules: PartyRules) -> None:
    meta = answered(unclassified(AUDIO, Flag.METADATA_INVALID))
    update = run(rules, customer(), service(), employee())
    merged = apply_update(meta, update, LATER)
    assert merged.customer.masked == "+358401234***"
    assert merged.direction is Direction.INBOUND
    assert merged.service_number == "+358201234567"
    assert [(e.id, e.joined_at) for e in merged.employees] == [("e1001", LATER)]
    assert merged.flags == ()


def test_an_unknown_employee_joining_is_kept_with_its_extension(rules: PartyRules) -> None:
    meta = answered(run(rules, customer(), service(), employee()))
    update = run(rules, customer(), Party("x", "sip:1099@pbx", None, "2"))
    merged = apply_update(meta, update, LATER)
    assert [(e.id, e.aor) for e in merged.employees] == [
        ("e1001", EMPLOYEE),
        ("unknown", "sip:1099@pbx"),
    ]
    assert Flag.EMPLOYEE_UNKNOWN not in merged.flags


# ---------------------------------------------------------------- per-client sources


def _client_invite(metadata: str | None, headers: str) -> str:
    if metadata is None:
        return raw_invite(SDP_TWO, "application/sdp", "Require: siprec\r\n" + headers)
    body = (
        "--b\r\nContent-Type: application/sdp\r\n\r\n" + SDP_TWO + "\r\n"
        "--b\r\nContent-Type: application/rs-metadata+xml\r\n\r\n" + metadata + "\r\n--b--\r\n"
    )
    return raw_invite(body, "multipart/mixed;boundary=b", "Require: siprec\r\n" + headers)


def test_service_line_and_employee_from_the_clients_headers(rules: PartyRules) -> None:
    """The metadata names only the caller and an extension nobody knows: the client's
    configured headers give the service line and the employee."""
    client = SipClient("10.1.2.0/24", "P-Called-Party-ID", None, "X-Agent")
    xml = metadata_xml([customer(sends="1"), employee("sip:9999@pbx.example", sends="2")])
    headers = (
        "P-Called-Party-ID: <sip:+35898765432@pbx.example;user=phone>\r\n"
        "X-Agent: <sip:1001@pbx.example>\r\n"
    )
    plan = plan_call(_client_invite(xml, headers), DIRECTORY, rules, HEADERS, 2, client)
    assert plan.parties.service_number == "+35898765432"
    assert [e.id for e in plan.parties.employees] == ["e1001"]
    assert plan.parties.flags == ()
    without = plan_call(_client_invite(xml, headers), DIRECTORY, rules, HEADERS, 2)
    assert {Flag.SERVICE_UNKNOWN, Flag.EMPLOYEE_UNKNOWN} <= set(without.parties.flags)


def test_fixed_service_line_and_first_diversion_entry(rules: PartyRules) -> None:
    xml = metadata_xml([customer(sends="1"), employee(sends="2")])
    fixed = SipClient("192.0.2.7/32", service_number="+358 20 123 4567")
    plan = plan_call(_client_invite(xml, ""), DIRECTORY, rules, HEADERS, 2, fixed)
    assert plan.parties.service_number == "+358201234567" and plan.parties.flags == ()
    diversion = SipClient("192.0.2.7/32", service_header="Diversion")
    headers = 'Diversion: "Palvelu, Oy" <tel:+358201234567>;reason=unconditional, <sip:1@x>\r\n'
    plan = plan_call(_client_invite(xml, headers), DIRECTORY, rules, HEADERS, 2, diversion)
    assert plan.parties.service_number == "+358201234567"


def test_history_info_gives_the_first_target_not_the_agent_it_was_diverted_to(
    rules: PartyRules,
) -> None:
    xml = metadata_xml([customer(sends="1"), employee(sends="2")])
    client = SipClient("192.0.2.7/32", service_header="History-Info")
    headers = (
        "History-Info: <sip:+358201234567@pbx.example>;index=1,"
        ' "Aino, V" <sip:1001@pbx.example?Reason=SIP%3Bcause%3D302>;index=1.1\r\n'
    )
    plan = plan_call(_client_invite(xml, headers), DIRECTORY, rules, HEADERS, 2, client)
    assert plan.parties.service_number == "+358201234567" and plan.parties.flags == ()


def test_clients_header_never_puts_a_customer_number_in_the_service_line(
    rules: PartyRules,
) -> None:
    """Only a configured service number is taken from a header: a misconfigured
    header naming the customer leaves the service line unknown."""
    client = SipClient("10.1.2.0/24", service_header="P-Asserted-Identity")
    xml = metadata_xml([customer(sends="1"), employee(sends="2")])
    headers = "P-Asserted-Identity: <sip:+358401234567@pbx.example>\r\n"
    plan = plan_call(_client_invite(xml, headers), DIRECTORY, rules, HEADERS, 2, client)
    assert plan.parties.service_number is None
    assert Flag.SERVICE_UNKNOWN in plan.parties.flags


def test_employee_header_also_fills_a_call_without_metadata(rules: PartyRules) -> None:
    client = SipClient("10.1.2.0/24", employee_header="X-Agent")
    raw = _client_invite(None, "X-Agent: sip:1001@pbx.example\r\n")
    plan = plan_call(raw, DIRECTORY, rules, HEADERS, 2, client)
    assert [e.id for e in plan.parties.employees] == ["e1001"]
    assert Flag.METADATA_MISSING in plan.parties.flags
    assert Flag.EMPLOYEE_UNKNOWN not in plan.parties.flags


def test_metadata_in_an_unknown_encoding_is_recorded_flagged(rules: PartyRules) -> None:
    xml = '<?xml version="1.0" encoding="x-unknown"?><recording/>'
    plan = plan_call(_client_invite(xml, ""), DIRECTORY, rules, HEADERS, 2)
    assert Flag.METADATA_INVALID in plan.parties.flags and len(plan.legs) == 2
    assert plan.problem is not None and "encoding" in plan.problem


def test_metadata_kept_aside_by_the_front_is_used(rules: PartyRules) -> None:
    xml = metadata_xml([customer(sends="1"), service(), employee(sends="2")])
    raw = raw_invite(SDP_TWO, "application/sdp", "Require: siprec\r\nX-Callrec-Metadata: t\r\n")
    plan = plan_call(raw, DIRECTORY, rules, HEADERS, 2, metadata=xml)
    assert plan.parties.flags == () and plan.parties.customer.masked == "+358401234***"
