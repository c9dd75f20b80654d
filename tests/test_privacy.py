"""Masking and sealing: pure functions, tested without a network."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from agent.privacy import (
    KeyFileError,
    NumberKind,
    Sealer,
    check_private_file,
    mask,
    normalise,
    read_key_file,
    unseal,
    uri_user,
)
from tests.support.stack import Keys


@pytest.mark.parametrize(
    "raw",
    [
        "+358401234567",
        "0401234567",
        "040 123 4567",
        "040-123 45 67",
        "00358401234567",
        "+358 (0)40 123 4567".replace("(0)", ""),
        "sip:+358401234567@pbx.example;user=phone",
        "sips:0401234567@pbx.example",
        "tel:+358-40-123-4567",
        '"Matti Meikäläinen" <sip:+358401234567@sbc.example>',
        "sip:%2B358401234567@pbx.example",
    ],
)
def test_finnish_formats_normalise_to_one_e164(raw: str) -> None:
    result = normalise(raw, "FI")
    assert result.kind is NumberKind.NUMBER
    assert result.e164 == "+358401234567"


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("sip:anonymous@anonymous.invalid", NumberKind.ANONYMOUS),
        ("Anonymous", NumberKind.ANONYMOUS),
        ("restricted", NumberKind.ANONYMOUS),
        ("", NumberKind.UNKNOWN),
        (None, NumberKind.UNKNOWN),
        ("unknown", NumberKind.UNKNOWN),
        ("sip:alice@example.com", NumberKind.INVALID),
        ("12", NumberKind.INVALID),
    ],
)
def test_non_numbers_stay_what_they_are(raw: str | None, kind: NumberKind) -> None:
    assert normalise(raw, "FI").kind is kind


def test_service_and_foreign_numbers() -> None:
    assert normalise("0100 5577", "FI").e164 == "+3581005577"
    assert normalise("+46 8 123 456 78", "FI").e164 == "+46812345678"


def test_mask_keeps_length_and_hides_three() -> None:
    assert mask("+358401234567") == "+358401234***"
    assert len(mask("+46812345678")) == len("+46812345678")


def test_protect_produces_masked_form_and_seal_only(keys: Keys) -> None:
    protector = keys.protector()
    protected = protector.protect("040 123 4567")
    assert protected.masked == "+358401234***"
    assert protected.tail_sealed and "567" not in protected.tail_sealed
    assert set(vars(protected)) == {"kind", "masked", "tail_sealed"}, "no digest any more"
    private = serialization.load_pem_private_key(keys.seal_private.read_bytes(), None)
    assert unseal(private, protected.tail_sealed) == "567"  # type: ignore[arg-type]
    again = protector.protect("+358401234567").tail_sealed
    assert again != protected.tail_sealed, "sealing is randomised: equal numbers look unequal"


def test_withheld_has_no_seal(keys: Keys) -> None:
    protected = keys.protector().protect("sip:anonymous@anonymous.invalid")
    assert protected.kind is NumberKind.ANONYMOUS
    assert protected.masked == "anonymous"
    assert protected.tail_sealed is None


@given(st.from_regex(r"\A04[0-9]{8}\Z"))
def test_any_format_gives_the_same_masked_form(national: str) -> None:
    e164 = normalise(national, "FI").e164
    assert e164 is not None
    spaced = f"{national[:3]} {national[3:6]} {national[6:]}"
    international = "00358" + national[1:]
    uri = f"sip:+358{national[1:]}@pbx.example"
    forms = {mask(normalise(v, "FI").e164 or "") for v in (national, spaced, international, uri)}
    assert forms == {mask(e164)}
    assert mask(e164).endswith("***") and national[-3:] not in mask(e164)[-3:]


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("k1 " + "A" * 43 + "=\n")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by group or others"):
        check_private_file(path)


def test_malformed_key_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("k1 not-base64!\n")
    with pytest.raises(KeyFileError, match=r"master.key:1: expected"):
        read_key_file(path)


def test_sealer_refuses_non_key(tmp_path: Path) -> None:
    path = tmp_path / "seal.pub.pem"
    path.write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        Sealer.load(path)


def test_uri_user() -> None:
    assert uri_user('"Aino" <sip:1001@pbx.example;transport=udp>') == "1001"
    assert uri_user("tel:+358-40-123-4567;phone-context=example") == "+358-40-123-4567"
