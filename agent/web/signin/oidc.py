"""The web's OpenID Connect client: authorization code with PKCE (S256), the refresh
grant and token revocation (RFC 7009) against the company's provider.

Small on purpose: the web process has an 80 MB budget, and a general OAuth library
with its HTTP client and JOSE stack costs ~19 MiB of it. What the web needs is four
HTTPS exchanges with one provider. The ID token comes straight from the provider's
token endpoint over verified TLS, so its issuer is that provider (OpenID Connect Core
3.1.3.7); the web checks the issuer, audience and nonce claims, and the store verifies
the signature and expiry itself on every request (``agent/store/access/identity.py``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from agent import logs
from agent.web.config import OidcClientConfig

log = logs.get_logger(__name__)

TIMEOUT_S = 10.0
MAX_ANSWER = 256 * 1024  # a discovery document or token response is a few kB
MAX_TOKEN_CHARS = 16 * 1024


class OidcError(Exception):
    """The provider refused or could not be asked; the message is safe to log."""


@dataclass(frozen=True)
class Pending:
    """What a sign-in started with, kept in the session until the callback."""

    state: str
    nonce: str
    verifier: str

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "nonce": self.nonce, "verifier": self.verifier}


@dataclass(frozen=True)
class Tokens:
    id_token: str
    refresh_token: str  # "" when the provider gives none
    issued_at: int  # the ID token's iat and exp (seconds since the epoch)
    expires_at: int


def claims_of(id_token: str) -> dict[str, Any]:
    """The ID token's payload, decoded but not verified (the store verifies it)."""
    try:
        payload = id_token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        raise OidcError("the ID token is not a JWT") from None
    if not isinstance(data, dict):
        raise OidcError("the ID token's payload is not an object")
    return data


class OidcClient:
    def __init__(self, config: OidcClientConfig) -> None:
        self.config = config
        self.issuer = config.issuer.rstrip("/")
        self._secret = config.client_secret_file.read_text().strip()
        self._tls = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None
        )
        self._metadata: dict[str, Any] | None = None

    # ------------------------------------------------------------ the provider

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once, again after a failure)."""
        if self._metadata is None:
            url = self.issuer + "/.well-known/openid-configuration"
            found = await asyncio.to_thread(self._request, url, None)
            if found.get("issuer", "").rstrip("/") != self.issuer:
                raise OidcError(f"discovery names another issuer: {found.get('issuer')!r}")
            for key in ("authorization_endpoint", "token_endpoint"):
                if not str(found.get(key, "")).startswith("https://"):
                    raise OidcError(f"discovery: {key} is not an https:// URL")
            self._metadata = found
        return self._metadata

    def _request(self, url: str, form: dict[str, str] | None) -> dict[str, Any]:
        if not url.startswith("https://"):
            raise OidcError(f"{url[:100]!r}: the provider's endpoints must be https:// URLs")
        headers = {"accept": "application/json"}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            basic = f"{_quote(self.config.client_id)}:{_quote(self._secret)}"
            headers["authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
        request = urllib.request.Request(url, body, headers)  # noqa: S310 (https, checked)
        try:
            with urllib.request.urlopen(  # noqa: S310 (https only, checked above)
                request, timeout=TIMEOUT_S, context=self._tls
            ) as answer:
                raw = answer.read(MAX_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            raise OidcError(f"{url}: HTTP {exc.code} {_error_of(exc.read(4096))}") from None
        except (OSError, ValueError) as exc:
            self._metadata = None
            raise OidcError(f"{url}: {exc}") from None
        if len(raw) > MAX_ANSWER:
            raise OidcError(f"{url}: answer too large")
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise OidcError(f"{url}: not JSON") from None
        if not isinstance(data, dict):
            raise OidcError(f"{url}: not a JSON object")
        return data

    # ------------------------------------------------------------ sign-in

    async def authorize_url(self, redirect_uri: str) -> tuple[str, Pending]:
        endpoint = (await self.metadata())["authorization_endpoint"]
        pending = Pending(
            state=secrets.token_urlsafe(24),
            nonce=secrets.token_urlsafe(24),
            verifier=secrets.token_urlsafe(48),
        )
        challenge = hashlib.sha256(pending.verifier.encode()).digest()
        query = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": self.config.scopes,
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": base64.urlsafe_b64encode(challenge).rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
        if "offline_access" in self.config.scopes.split():
            query["prompt"] = "consent"  # OpenID Connect Core 11: offline_access needs it
        return f"{endpoint}?{urllib.parse.urlencode(query)}", pending

    async def exchange(self, code: str, redirect_uri: str, pending: Pending) -> Tokens:
        """The callback's code for tokens; the ID token must answer this sign-in."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": pending.verifier,
        }
        tokens = await self._token(form)
        nonce = claims_of(tokens.id_token).get("nonce")
        if not isinstance(nonce, str) or not secrets.compare_digest(nonce, pending.nonce):
            raise OidcError("the ID token does not answer this sign-in (nonce)")
        return tokens

    async def refresh(self, refresh_token: str) -> Tokens:
        """A new ID token for a live session (the refresh grant); the provider may
        rotate the refresh token, else the old one stays."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        tokens = await self._token(form)
        if not tokens.refresh_token:
            tokens = Tokens(tokens.id_token, refresh_token, tokens.issued_at, tokens.expires_at)
        return tokens

    async def revoke(self, refresh_token: str) -> bool:
        """Revoke the refresh token (sign-out); False when the provider has no
        revocation endpoint or could not be reached (logged)."""
        if not refresh_token:
            return False
        try:
            endpoint = (await self.metadata()).get("revocation_endpoint")
            if not endpoint:
                return False
            form = {"token": refresh_token, "token_type_hint": "refresh_token"}
            await asyncio.to_thread(self._request, endpoint, form)
        except OidcError as exc:
            log.warning("web_revoke_failed", error=str(exc)[:200])
            return False
        return True

    async def _token(self, form: dict[str, str]) -> Tokens:
        endpoint = (await self.metadata())["token_endpoint"]
        answer = await asyncio.to_thread(self._request, endpoint, form)
        id_token, refresh = answer.get("id_token"), answer.get("refresh_token", "")
        if not isinstance(id_token, str) or not 0 < len(id_token) <= MAX_TOKEN_CHARS:
            raise OidcError("the token endpoint gave no ID token")
        if not isinstance(refresh, str) or len(refresh) > MAX_TOKEN_CHARS:
            raise OidcError("the token endpoint gave a malformed refresh token")
        claims = claims_of(id_token)
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if str(claims.get("iss", "")).rstrip("/") != self.issuer:
            raise OidcError("the ID token names another issuer")
        if self.config.client_id not in audiences:
            raise OidcError("the ID token is for another client")
        now = int(time.time())
        issued = _int(claims.get("iat"), now)
        return Tokens(id_token, refresh, issued, _int(claims.get("exp"), now))


def refresh_due(issued_at: int, expires_at: int, now: float) -> bool:
    """Time to refresh: within a minute of expiry, or the last third of a short life."""
    margin = min(60.0, max(1.0, (expires_at - issued_at) / 3))
    return now >= expires_at - margin


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _error_of(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    return str(data.get("error", ""))[:80]
