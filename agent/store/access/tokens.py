"""Per-person access tokens: random, shown once, kept only as a hash.

A token reads ``crt1.<token id>.<secret>``: the id (8 random bytes, hex) finds the row,
the secret (32 random bytes, URL-safe base64) is checked against ``secret_sha256``.
The secret has 256 bits of entropy, so a plain SHA-256 is enough (no password
stretching needed) and a stolen catalog yields no usable token. Revoking sets
``revoked_at_ms``; rows are kept so that the audit log's ``token:<id>`` actors stay
explainable. A token expires (``expires_at_ms``; 90 days unless the operator says
otherwise, at most 400 days; tokens made before expiry existed have none and work until
revoked). ``last_used_at_ms`` is written at most once a minute per token, so that
``callrec access token list`` can show which tokens are still in use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from agent.store.catalog import Catalog, metadata, now_ms

PREFIX = "crt1"
_TOKEN = re.compile(r"crt1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")
DAY_MS = 86_400_000
DEFAULT_LIFETIME_DAYS = 90
MAX_LIFETIME_DAYS = 400
USE_RECORD_EVERY_MS = 60_000

access_tokens = sa.Table(
    "access_tokens",
    metadata,
    sa.Column("token_id", sa.String(16), primary_key=True),
    sa.Column("person_id", sa.String(64), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("revoked_at_ms", sa.BigInteger, nullable=True),
    sa.Column("expires_at_ms", sa.BigInteger, nullable=True),  # migration 0006
    sa.Column("last_used_at_ms", sa.BigInteger, nullable=True),
    sa.Index("ix_access_tokens_person", "person_id"),
)


@dataclass(frozen=True)
class NewToken:
    token_id: str
    person_id: str
    token: str  # shown once; never stored


@dataclass(frozen=True)
class TokenCheck:
    """Whose token it is, or why it authenticates nobody."""

    token_id: str | None
    person_id: str | None
    problem: str = ""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    conn: sa.Connection,
    person_id: str,
    created_by: str,
    lifetime_days: int = DEFAULT_LIFETIME_DAYS,
) -> NewToken:
    """A new token for ``person_id``, valid for ``lifetime_days`` (1..400)."""
    if not 1 <= lifetime_days <= MAX_LIFETIME_DAYS:
        raise ValueError(f"token lifetime: expected 1..{MAX_LIFETIME_DAYS} days")
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    created = now_ms()
    conn.execute(
        sa.insert(access_tokens).values(
            token_id=token_id,
            person_id=person_id,
            secret_sha256=_hash(secret),
            created_at_ms=created,
            created_by=created_by[:200],
            expires_at_ms=created + lifetime_days * DAY_MS,
        )
    )
    return NewToken(token_id, person_id, f"{PREFIX}.{token_id}.{secret}")


def parse_lifetime(text: str) -> int:
    """``90d``, ``12w`` or ``90`` (days) → days; ValueError naming what is expected."""
    match = re.fullmatch(r"\s*(\d{1,4})\s*([dw]?)\s*", text)
    if match is None:
        raise ValueError(f"--expires {text!r}: expected days such as 90d or weeks such as 12w")
    days = int(match.group(1)) * (7 if match.group(2) == "w" else 1)
    if not 1 <= days <= MAX_LIFETIME_DAYS:
        raise ValueError(f"--expires {text!r}: expected 1 to {MAX_LIFETIME_DAYS} days")
    return days


def list_tokens(
    conn: sa.Connection, person_id: str | None = None
) -> Sequence[sa.Row[tuple[object, ...]]]:
    """Every token (no secret, no hash), newest first; one person's with ``person_id``."""
    columns = [c for c in access_tokens.c if c.name != "secret_sha256"]
    query = sa.select(*columns).order_by(access_tokens.c.created_at_ms.desc())
    if person_id is not None:
        query = query.where(access_tokens.c.person_id == person_id)
    return list(conn.execute(query))


def revoke(conn: sa.Connection, token_id: str | None = None, person_id: str | None = None) -> int:
    """Revoke one token, or every live token of a person; returns how many."""
    if (token_id is None) == (person_id is None):
        raise ValueError("give a token id or a person id")
    match = (
        access_tokens.c.token_id == token_id
        if token_id is not None
        else access_tokens.c.person_id == person_id
    )
    result = conn.execute(
        sa.update(access_tokens)
        .where(match, access_tokens.c.revoked_at_ms.is_(None))
        .values(revoked_at_ms=now_ms())
        .returning(access_tokens.c.token_id)
    )
    return len(result.all())


def token_id_of(token: str) -> str | None:
    """The id part of a well-formed token (for the audit of a failed attempt)."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


def check(catalog: Catalog, token: str) -> TokenCheck:
    match = _TOKEN.fullmatch(token)
    if match is None:
        return TokenCheck(None, None, "malformed token")
    token_id, secret = match.groups()
    with catalog.engine.connect() as conn:
        row = conn.execute(
            sa.select(access_tokens).where(access_tokens.c.token_id == token_id)
        ).first()
    if row is None or not hmac.compare_digest(row.secret_sha256, _hash(secret)):
        return TokenCheck(token_id, None, "unknown token")
    if row.revoked_at_ms is not None:
        return TokenCheck(token_id, row.person_id, "revoked token")
    now = now_ms()
    if row.expires_at_ms is not None and row.expires_at_ms <= now:
        return TokenCheck(token_id, row.person_id, "expired token")
    if row.last_used_at_ms is None or now - row.last_used_at_ms >= USE_RECORD_EVERY_MS:
        _record_use(catalog, token_id, now)
    return TokenCheck(token_id, row.person_id)


def _record_use(catalog: Catalog, token_id: str, now: int) -> None:
    with catalog.engine.begin() as conn:
        conn.execute(
            sa.update(access_tokens)
            .where(access_tokens.c.token_id == token_id)
            .values(last_used_at_ms=now)
        )
