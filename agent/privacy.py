"""The privacy boundary: a customer's number becomes a masked form and sealed last
digits (RSA-OAEP, randomised, to the store's public key). Nothing downstream of these
functions ever sees the full number, and nothing an agent host keeps can be checked
against a guessed number: the agent holds no lookup key and writes no digest. Only
the store, holding ``seal.pem``, can open the tail (``agent.store.keys.numbers``).

Pure functions and a small key holder; no I/O except reading key files.
"""

from __future__ import annotations

import base64
import re
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import unquote

import phonenumbers
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MASK = "***"
TAIL_DIGITS = 3


class NumberKind(StrEnum):
    NUMBER = "number"  # a valid phone number, normalised to E.164
    ANONYMOUS = "anonymous"  # withheld / restricted / anonymous by the caller
    UNKNOWN = "unknown"  # the PBX did not say
    INVALID = "invalid"  # something was there but it is not a phone number


class KeyFileError(ValueError):
    """A key file that is missing, malformed, or readable by others."""


_ANONYMOUS = {"anonymous", "restricted", "withheld", "private", "unavailable", "hidden"}
_UNKNOWN = {"", "unknown", "none", "null", "invalid"}
_URI = re.compile(r"^(?:sips?|tel):", re.IGNORECASE)
_VISUAL = re.compile(r"[\s\-\.\(\)/]")


def uri_user(raw: str) -> str:
    """The user part of a SIP/SIPS/tel URI or name-addr; a bare string is returned as is.

    ``"Aino" <sip:+358401234567@pbx;user=phone>`` → ``+358401234567``;
    ``tel:+358-40-123-4567;phone-context=x`` → ``+358-40-123-4567``.
    """
    value = raw.strip()
    if "<" in value and ">" in value:
        value = value[value.index("<") + 1 : value.rindex(">")]
    value = unquote(value.strip())
    if _URI.match(value):
        value = value.split(":", 1)[1]
        value = value.split("@", 1)[0]
        value = value.split(";", 1)[0]
        value = value.split("?", 1)[0]
    return value.strip()


@dataclass(frozen=True)
class Normalised:
    kind: NumberKind
    e164: str | None = None  # only for NumberKind.NUMBER; never stored


def normalise(raw: str | None, region: str) -> Normalised:
    """Parse whatever the PBX sent into E.164, or say why it is not a number."""
    if raw is None:
        return Normalised(NumberKind.UNKNOWN)
    user = uri_user(raw)
    lowered = user.lower()
    if lowered in _ANONYMOUS or lowered.startswith("anonymous"):
        return Normalised(NumberKind.ANONYMOUS)
    if lowered in _UNKNOWN:
        return Normalised(NumberKind.UNKNOWN)
    compact = _VISUAL.sub("", user)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if not re.fullmatch(r"\+?\d{3,17}", compact):
        return Normalised(NumberKind.INVALID)
    try:
        parsed = phonenumbers.parse(compact, region)
    except phonenumbers.NumberParseException:
        return Normalised(NumberKind.INVALID)
    if not phonenumbers.is_possible_number(parsed):
        return Normalised(NumberKind.INVALID)
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return Normalised(NumberKind.NUMBER, e164)


def mask(e164: str) -> str:
    """``+358401234567`` → ``+358401234***`` (same length, last three digits hidden)."""
    if len(e164) <= TAIL_DIGITS + 1:
        return "+" + MASK
    return e164[:-TAIL_DIGITS] + MASK


def tail(e164: str) -> str:
    return e164[-TAIL_DIGITS:]


# ---------------------------------------------------------------- keys


def check_private_file(path: Path) -> None:
    """Refuse a secret that other users could read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: key file not found (create it with `callrec keys init`)"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: key file is readable by group or others (mode {stat.S_IMODE(mode):o}); "
            "run chmod 600"
        )


_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def read_key_file(path: Path, key_bytes: int = 32) -> list[tuple[str, bytes]]:
    """Lines of ``<key id> <base64 secret>`` (the first is the active key; ``#``
    comments allowed). Used for the store's master keys."""
    keys: list[tuple[str, bytes]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, _, encoded = line.partition(" ")
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except ValueError:
            secret = b""
        if not _KEY_ID.fullmatch(key_id) or len(secret) != key_bytes:
            raise KeyFileError(
                f"{path}:{lineno}: expected '<key id> <base64 of {key_bytes} random bytes>'"
            )
        keys.append((key_id, secret))
    if not keys:
        raise KeyFileError(f"{path}: no keys in file")
    return keys


_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True)
class Sealer:
    """Encrypts the last digits to a public key; the agent never holds the private half."""

    public_key: rsa.RSAPublicKey

    @classmethod
    def load(cls, path: Path) -> Sealer:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except FileNotFoundError:
            raise KeyFileError(f"{path}: public key not found") from None
        except ValueError as exc:
            raise KeyFileError(f"{path}: not a PEM public key: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            raise KeyFileError(f"{path}: expected an RSA public key of at least 2048 bits")
        return cls(key)

    def seal(self, plaintext: str) -> str:
        return base64.b64encode(self.public_key.encrypt(plaintext.encode(), _OAEP)).decode()


def unseal(private_key: rsa.RSAPrivateKey, sealed: str) -> str:
    return private_key.decrypt(base64.b64decode(sealed), _OAEP).decode()


def new_seal_keypair() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) for a 3072-bit RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


# ---------------------------------------------------------------- the protected form


@dataclass(frozen=True)
class ProtectedNumber:
    """What the register keeps of a customer's number."""

    kind: NumberKind
    masked: str  # "+358401234***", or the kind's name for non-numbers
    tail_sealed: str | None = None


@dataclass(frozen=True)
class Protector:
    """What an agent host holds: the region for national numbers and the store's
    public seal key. No lookup key: an agent host's files give nothing to test a
    guessed number against (only the store, with ``seal.pem``, opens the tail)."""

    region: str
    sealer: Sealer

    @classmethod
    def load(cls, region: str, seal_public_key_file: Path) -> Protector:
        return cls(region, Sealer.load(seal_public_key_file))

    def protect(self, raw: str | None) -> ProtectedNumber:
        norm = normalise(raw, self.region)
        if norm.e164 is None:
            return ProtectedNumber(norm.kind, norm.kind.value)
        return ProtectedNumber(
            NumberKind.NUMBER,
            masked=mask(norm.e164),
            tail_sealed=self.sealer.seal(tail(norm.e164)),
        )
