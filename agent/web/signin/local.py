"""The demo's local sign-in (``[web.local]``, loopback only): the web itself acts as a
tiny OpenID issuer for the listed directory people, so the demo needs no company
provider. It mints real ID tokens (RS256, a key made at start and kept in memory) and
publishes its keys at ``/local/jwks``; the store verifies them exactly as it verifies
the company provider's (``[store.oidc] issuer = "https://127.0.0.1:<port>/local"``).
Production uses ``[web.oidc]``; the config refuses ``[web.local]`` off loopback."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agent.web.config import WebConfig
from agent.web.render import message, page
from agent.web.signin.sessions import csrf_ok, csrf_token

AUDIENCE = "callrec-web-local"
TTL_S = 3600


class LocalIssuer:
    def __init__(self, issuer: str) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer = issuer
        self.kid = secrets.token_hex(4)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def discovery(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks"}

    def jwks(self) -> dict[str, Any]:
        import jwt

        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def mint(self, person_id: str) -> str:
        import jwt

        now = int(time.time())
        claims = {"iss": self.issuer, "sub": person_id, "aud": AUDIENCE, "iat": now,
                  "exp": now + TTL_S}  # fmt: skip
        return jwt.encode(claims, self._key, "RS256", headers={"kid": self.kid})


def issuer(config: WebConfig) -> LocalIssuer | None:
    """The demo's issuer when ``[web.local]`` lists people (cryptography and PyJWT are
    imported only then: the production web does without them)."""
    return LocalIssuer(issuer_url(config.listen)) if config.local_people else None


def issuer_url(listen: str) -> str:
    return f"https://{listen}/local"


def _not_here() -> Response:
    return Response(b"", 404)


async def discovery(request: Request) -> Response:
    local = request.app.state.local
    return JSONResponse(local.discovery()) if local else _not_here()


async def jwks(request: Request) -> Response:
    local = request.app.state.local
    return JSONResponse(local.jwks()) if local else _not_here()


async def sign_in_page(request: Request) -> Response:
    csrf_token(request.session)
    people = request.app.state.config.local_people
    return page(request, "local_signin.html", people=people, form_csrf=request.session["csrf"])


async def sign_in(request: Request) -> Response:
    from agent.web.signin.auth import establish, local_tokens

    if request.app.state.local is None:
        return _not_here()
    form = await request.form(max_files=0, max_fields=5)
    person = str(form.get("person", ""))
    if not csrf_ok(request.session, str(form.get("csrf", ""))):
        return message(request, 403, "no_access", "csrf")
    if person not in request.app.state.config.local_people:
        return message(request, 403, "no_access", "not_in_directory")
    return await establish(request, local_tokens(request.app.state.local.mint(person)))
