"""Sign-in with the company's OpenID provider (authorization code + PKCE, Authlib),
the store's word on who that is (WhoAmI), and sign-out.

The ID token is kept in the server-side session and sent to the store with every
request; the store verifies it itself. A person the directory does not know, or who
has no training date, gets a page that says so and no session."""

from __future__ import annotations

import ssl
from typing import Any

import grpc
from authlib.integrations.starlette_client import OAuth, OAuthError
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from agent import logs
from agent.web.config import WebConfig
from agent.web.render import message, page
from agent.web.sessions import ROTATE, csrf_ok
from agent.web.store_client import StoreClient, StoreRefused

log = logs.get_logger(__name__)


def oauth_client(config: WebConfig) -> Any:
    oidc = config.oidc
    if oidc is None:
        return None
    verify: Any = True
    if oidc.ca_file is not None:
        verify = ssl.create_default_context(cafile=str(oidc.ca_file))
    oauth = OAuth()
    oauth.register(
        "company",
        client_id=oidc.client_id,
        client_secret=oidc.client_secret_file.read_text().strip(),
        server_metadata_url=oidc.issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_kwargs={"scope": oidc.scopes, "code_challenge_method": "S256", "verify": verify},
    )
    return oauth.company


def redirect_uri(request: Request, config: WebConfig) -> str:
    base = config.public_url or str(request.base_url)
    return base.rstrip("/") + "/auth/callback"


async def sign_in(request: Request) -> Response:
    app = request.app.state
    request.session.pop("person", None)
    if app.oauth is None:
        from agent.web.local_signin import sign_in_page

        return await sign_in_page(request)
    response: Response = await app.oauth.authorize_redirect(
        request, redirect_uri(request, app.config)
    )
    return response


async def callback(request: Request) -> Response:
    state = request.app.state
    try:
        token = await state.oauth.authorize_access_token(request)
    except (OAuthError, ValueError) as exc:
        log.info("web_sign_in_failed", error=str(exc)[:200])
        return message(request, 400, "no_access", "session_over")
    return await establish(request, str(token.get("id_token", "")))


async def establish(request: Request, id_token: str) -> Response:
    """Ask the store who the ID token names; a session only for a trained person."""
    store: StoreClient = request.app.state.store
    try:
        person = await store.whoami(id_token)
    except StoreRefused as exc:
        request.session.clear()
        if exc.code is grpc.StatusCode.UNAUTHENTICATED:
            log.info("web_sign_in_refused", why=exc.message[:200])
            return message(request, 403, "no_access", "not_in_directory")
        return message(request, 503, "no_access", "unavailable")
    request.session.clear()
    if not person.trained:
        log.info("web_sign_in_refused", person=person.id, why="no training date")
        return message(request, 403, "no_access", "not_trained")
    request.session.update(
        person={"id": person.id, "name": person.name, "role": person.role, "team": person.team},
        id_token=id_token,
        purposes={},
    )
    request.session[ROTATE] = True
    log.info("web_signed_in", person=person.id, role=person.role)
    return RedirectResponse("/search", 303)


async def sign_out(request: Request) -> Response:
    form = await request.form()
    if not csrf_ok(request.session, str(form.get("csrf", ""))):
        return message(request, 403, "no_access", "csrf")
    person = request.session.get("person") or {}
    request.session.clear()
    log.info("web_signed_out", person=person.get("id", "-"))
    return page(request, "message.html", title_key="sign_out", text_key="signed_out", home=True)
