"""Redaction of possible phone numbers, not of digit runs: a number is caught wherever
it stands, ids, digests, masked numbers, status codes and case references are kept."""

from __future__ import annotations

import re
import secrets

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.redaction import REDACTED, redact_numbers
from agent.store.access.rules import scrub

REGIONS = ("FI", "SE", "DE", "GB", "US", "FR")


@st.composite
def numbers(draw: st.DrawFn) -> phonenumbers.PhoneNumber:
    """A valid number of one of REGIONS (an example number with its last digits varied)."""
    region = draw(st.sampled_from(REGIONS))
    kind = draw(
        st.sampled_from(
            [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]
        )
    )
    example = phonenumbers.example_number_for_type(region, kind)
    assert example is not None
    national = str(example.national_number)
    tail = draw(st.text("0123456789", min_size=3, max_size=3))
    example.national_number = int(national[:-3] + tail)
    return example


FORMATS = (
    phonenumbers.PhoneNumberFormat.E164,
    phonenumbers.PhoneNumberFormat.INTERNATIONAL,
    phonenumbers.PhoneNumberFormat.NATIONAL,
    phonenumbers.PhoneNumberFormat.RFC3966,
)


def written(number: phonenumbers.PhoneNumber, form: int, style: str) -> str:
    text = phonenumbers.format_number(number, form)
    if style == "url":
        text = text.replace("+", "%2B")
    elif style == "00":
        text = text.replace("+", "00")
    elif style == "compact":
        text = re.sub(r"[\s\-()]", "", text)
    return text


def digits_of(number: phonenumbers.PhoneNumber) -> str:
    return str(number.national_number)


AROUND = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20
) | st.sampled_from(["call_", "cid", "sip:", "x", "_", ".wav", "@pbx", "%2B", "ABC", "-"])


@settings(max_examples=300, deadline=None)
@given(
    number=numbers(),
    form=st.sampled_from(FORMATS),
    style=st.sampled_from(["plain", "url", "00", "compact"]),
    before=AROUND.filter(lambda text: not re.search(r"(?:[a-f]|[A-Z]{2}[\d-]*)$", text)),
    after=AROUND.filter(lambda text: not re.match("[*a-f]", text)),
)
def test_any_number_in_any_text_is_redacted(
    number: phonenumbers.PhoneNumber, form: int, style: str, before: str, after: str
) -> None:
    """Wherever it stands, except glued to a hex letter (it might form a 16/32/40/64
    hex id), after two upper-case letters (a case reference, ``SR0012345678``) or
    followed by ``*`` (``+358…***`` is a masked number): the forms
    :mod:`agent.redaction` keeps on purpose."""
    text = before + written(number, form, style) + after
    out = redact_numbers(text)
    assert digits_of(number) not in re.sub(r"\D", "", out), (text, out)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.builds(lambda: secrets.token_hex(16)), min_size=1, max_size=4))
def test_random_recording_ids_are_kept(ids: list[str]) -> None:
    text = "recording " + " and ".join(ids) + f" sha256={secrets.token_hex(32)}."
    assert redact_numbers(text) == text


def test_an_id_with_a_long_decimal_run_is_kept() -> None:
    for rid in ("a1234567890bcdef1234567890abcdef", "0401234567cdef0123456789abcdef01"):
        assert redact_numbers(f"recording_id={rid} in {rid}.json") == (
            f"recording_id={rid} in {rid}.json"
        )


@pytest.mark.parametrize(
    "text",
    [
        "call_0401234567.wav",
        "cid0401234567",
        "sip:%2B358401234567@pbx",
        "sip:%2b358401234567@pbx",
        "tel:+358-40-123-4567",
        "00358401234567",
        "040 123 4567",
        "+358 (0)40 123 4567",
        "From: <sip:358401234567@pbx>",
        "customer=0401234567;tag=1",
    ],
)
def test_numbers_next_to_anything_are_redacted(text: str) -> None:
    out = redact_numbers(text)
    assert REDACTED in out
    assert "1234567" not in out and "123 4567" not in out and "123-4567" not in out


@pytest.mark.parametrize(
    "text",
    [
        "customer=+358401234***",
        "PJSIP error status=171140",
        "Invalid request (PJ_EINVAL) 70004 / 171140",
        "case SR0012345678",
        "DSR-2026-0042 and INC-20260042",
        "listen=127.0.0.1:25547 rtp=192.168.100.200:40000-40099",
        "at 2026-11-27T22:08:59.003Z in spool-20261202T030425-e26572",
        "wrote 1048576 bytes (size=123456789, port=5060, pid=4194304)",
        "uuid 550e8400-e29b-41d4-a716-446655440000",
        "call_ref=9f69e283b5be2527",
        "+35840 is too short",
    ],
)
def test_what_is_not_a_number_is_kept(text: str) -> None:
    assert redact_numbers(text) == text


def test_the_case_reference_rule_is_upper_case_letters() -> None:
    """An upper-case prefix glued to digits is a reference; a lower-case one is not."""
    assert redact_numbers("SR0012345678 CASE-0401234567") == "SR0012345678 CASE-0401234567"
    assert redact_numbers("sr0401234567 Sr0401234567") == f"sr{REDACTED} Sr{REDACTED}"
    assert redact_numbers("AA040-123 4567") == f"AA{REDACTED}"


def test_audited_reasons_use_the_same_rule() -> None:
    """Issue 16: the privacy officer's case reference stays whole in the audit."""
    assert scrub("--reason SR0012345678") == "--reason SR0012345678"
    assert scrub("customer cid0401234567 asked") == "customer cid[number removed] asked"


def test_runs_glued_to_more_digits_are_still_redacted() -> None:
    assert redact_numbers("12345678900401234567") == REDACTED
    assert redact_numbers("+99912345678901") == REDACTED  # unknown country code
