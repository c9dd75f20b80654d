"""The people's web signs people in with the company's OpenID Connect provider; the
store does not take the web's word for who they are. The web forwards the person's ID
token (a JWT) as ``authorization: Bearer <jwt>``, and the store checks it here against
the issuer's published keys (JWKS): signature (asymmetric algorithms only), issuer,
audience (the web's client id), expiry and issue time. The configured claim names the
directory person (``sub`` by default; with Entra ID e.g. a custom ``employeeid``).

A token is recognised by its form (three dot-separated base64url parts, no ``crt1.``
prefix); personal tokens (``tokens.py``) keep working beside it. Each failure gives a
short reason for the audit log, never the token.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt

from agent import logs
from agent.config import StoreOidcConfig

log = logs.get_logger(__name__)

_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
_FETCH_TIMEOUT_S = 5.0
_MAX_TOKEN = 16 * 1024


def looks_like_jwt(token: str) -> bool:
    """A JWT's first part is base64url JSON (``eyJ`` = ``{"``); a personal token
    (``crt1.<id>.<secret>``) has three dot-separated parts too and is not one."""
    return len(token) <= _MAX_TOKEN and token.startswith("eyJ") and bool(_JWT.match(token))


@dataclass(frozen=True)
class Identity:
    """Who an ID token names (``person_id``), or why it names nobody (``problem``)."""

    person_id: str | None
    problem: str = ""
    subject: str = ""


class OidcVerifier:
    """Verifies ID tokens of one issuer; the keys are fetched on first use (discovery,
    then ``jwks_uri``) and again when a token names a key id not seen before."""

    def __init__(self, config: StoreOidcConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._client: jwt.PyJWKClient | None = None
        self._ssl = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None
        )

    def _jwks(self) -> jwt.PyJWKClient:
        with self._lock:
            if self._client is None:
                uri = self.config.jwks_uri or self._discover()
                self._client = jwt.PyJWKClient(
                    uri, cache_keys=True, lifespan=3600, timeout=int(_FETCH_TIMEOUT_S),
                    ssl_context=self._ssl,
                )  # fmt: skip
            return self._client

    def _discover(self) -> str:
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        if not url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise jwt.PyJWKClientConnectionError(f"issuer must be https: {self.config.issuer}")
        with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S, context=self._ssl) as r:  # noqa: S310
            document: dict[str, Any] = json.loads(r.read(256 * 1024))
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri:
            raise jwt.PyJWKClientConnectionError("the issuer's discovery document has no jwks_uri")
        return uri

    def verify(self, token: str) -> Identity:
        try:
            key = self._jwks().get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=list(self.config.audience),
                issuer=self.config.issuer,
                leeway=self.config.leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            return Identity(None, "expired ID token")
        except jwt.InvalidAudienceError:
            return Identity(None, "ID token for another audience")
        except jwt.InvalidIssuerError:
            return Identity(None, "ID token of another issuer")
        except (jwt.PyJWKClientConnectionError, OSError) as exc:
            log.warning("oidc_keys_unavailable", issuer=self.config.issuer, error=str(exc)[:200])
            return Identity(None, "the identity provider's keys cannot be fetched")
        except jwt.PyJWKClientError:
            return Identity(None, "ID token signed with a key the issuer does not publish")
        except jwt.PyJWTError as exc:
            return Identity(None, f"invalid ID token ({type(exc).__name__})")
        person = claims.get(self.config.person_claim)
        if not isinstance(person, str) or not person:
            return Identity(None, f"ID token has no {self.config.person_claim!r} claim")
        return Identity(person, subject=str(claims.get("sub", "")))
