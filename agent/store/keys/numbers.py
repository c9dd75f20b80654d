"""The store's side of the privacy boundary: the seal keyring that opens the sealed
last digits, and finding a data subject's calls from a number and a time.

No digest of a number is kept anywhere. To find the calls of ``+358401234567`` at
``T``, the store takes the recordings whose masked form is ``+358401234***`` and whose
call overlaps ``T ± window`` (the index ``ix_recordings_masked``), opens each one's
sealed tail in memory and keeps those whose tail is ``567``. A copy of the catalog, a
backup or an agent host therefore holds nothing a guessed number can be tested
against: the tail is RSA-OAEP (randomised) under a key only the store holds, and
every opening happens inside a request the Access service has authorised and audits.

``seal.pem`` is a keyring: one or more PEM private keys, the first being the one whose
public half agents seal to (``callrec keys seal rotate`` puts a new one first). Older
keys stay so that older recordings still open; a tail is tried against each key
(RSA-OAEP refuses a wrong key).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.privacy import (
    TAIL_DIGITS,
    KeyFileError,
    check_private_file,
    mask,
    new_seal_keypair,
    unseal,
)
from agent.store.catalog import Catalog, RecordingRow, recordings

# Calls sharing one masked form (1000 numbers) in the window that one find may open;
# past it the request must narrow its window (an opening is 1-6 ms of RSA-3072 on
# one core, so this bounds a find to seconds).
MAX_CANDIDATES = 2000
_PEM_BLOCK = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", re.S
)
_TAIL = re.compile(rf"\d{{{TAIL_DIGITS}}}")


class SealError(ValueError):
    """A sealed tail that no key of the keyring opens (or that opens to garbage)."""


class TooManyCandidates(ValueError):
    """More calls share the masked form in the window than one search may open."""


@dataclass(frozen=True)
class SealKeyring:
    keys: tuple[rsa.RSAPrivateKey, ...]  # the first is current

    @classmethod
    def load(cls, path: Path) -> SealKeyring:
        check_private_file(path)
        blocks = _PEM_BLOCK.findall(path.read_bytes())
        if not blocks:
            raise KeyFileError(f"{path}: no PEM private key in the file")
        keys = []
        for n, block in enumerate(blocks, 1):
            try:
                key = serialization.load_pem_private_key(block, password=None)
            except (ValueError, TypeError) as exc:
                raise KeyFileError(f"{path}: private key {n} unreadable: {exc}") from None
            if not isinstance(key, rsa.RSAPrivateKey):
                raise KeyFileError(f"{path}: private key {n} is not an RSA key")
            keys.append(key)
        return cls(tuple(keys))

    def open(self, sealed: str) -> str:
        """The last digits, or SealError."""
        for key in self.keys:
            try:
                digits = unseal(key, sealed)
            except ValueError:
                continue
            if _TAIL.fullmatch(digits):
                return digits
            raise SealError("the sealed digits open to something that is not digits")
        raise SealError("no key of the seal keyring opens the sealed digits")

    def public_pem(self) -> bytes:
        """The current key's public half: what every agent seals to."""
        return (
            self.keys[0]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def rotate_seal_key(path: Path) -> bytes:
    """Put a new private key first in ``path`` (older ones stay, to open older
    recordings); returns the new public PEM for the agents."""
    SealKeyring.load(path)  # refuse to touch a file we could not read back
    private, public = new_seal_keypair()
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private + path.read_bytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return public


@dataclass(frozen=True)
class Found:
    rows: list[RecordingRow]
    candidates: int  # calls whose tail was opened to compare


def candidates_query(masked: str, at_ms: int, window_ms: int, limit: int) -> sa.Select[Any]:
    """Live calls with this masked form whose answered part overlaps ``at ± window``
    (served by ``ix_recordings_masked``)."""
    c = recordings.c
    return (
        sa.select(recordings)
        .where(c.customer_masked == masked, c.customer_kind == "number")
        .where(c.destroy_reason.is_(None), c.customer_tail_sealed.is_not(None))
        .where(c.started_at_ms <= at_ms + window_ms, c.ended_at_ms >= at_ms - window_ms)
        .order_by(c.started_at_ms)
        .limit(limit)
    )


def candidates(
    catalog: Catalog, masked: str, at_ms: int, window_ms: int, limit: int
) -> list[RecordingRow]:
    query = candidates_query(masked, at_ms, window_ms, limit)
    with catalog.engine.connect() as conn:
        return [RecordingRow(**r._mapping) for r in conn.execute(query)]


def find_calls(
    catalog: Catalog, keyring: SealKeyring, e164: str, at_ms: int, window_ms: int
) -> Found:
    """The calls of ``e164`` around ``at_ms``, oldest first. The full number and the
    opened tails live only in this function's memory."""
    rows = candidates(catalog, mask(e164), at_ms, window_ms, MAX_CANDIDATES + 1)
    if len(rows) > MAX_CANDIDATES:
        raise TooManyCandidates(f"more than {MAX_CANDIDATES} calls share the masked number")
    tail = e164[-TAIL_DIGITS:]
    return Found([r for r in rows if _opens_to(keyring, r, tail)], len(rows))


def _opens_to(keyring: SealKeyring, row: RecordingRow, tail: str) -> bool:
    try:
        return (
            row.customer_tail_sealed is not None and keyring.open(row.customer_tail_sealed) == tail
        )
    except SealError:
        return False


class SealCache:
    """seal.pem, loaded again only when the file changes (a rotation, a chmod): loading
    and checking its RSA keys costs ~140 ms of CPU, an upload's commit a few ms."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, ...] | None = None
        self._ring: SealKeyring | None = None

    def keyring(self) -> SealKeyring:
        try:
            st = self.path.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode, st.st_uid)
        except OSError:
            seen = None  # SealKeyring.load says what is wrong
        ring = self._ring
        if ring is None or seen is None or seen != self._seen:
            ring = SealKeyring.load(self.path)
            self._ring, self._seen = ring, seen
        return ring
