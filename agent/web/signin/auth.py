"""Sign-in with the company's OpenID provider (authorization code + PKCE, ``oidc.py``),
the store's word on who that is (WhoAmI), the ID token kept fresh with the refresh
grant while the session lives, and sign-out (which revokes the refresh token).

The ID token is kept in the server-side session and sent to the store with every
request; the store verifies it itself. A person the directory does not know, or who
has no training date, gets a page that says so and no session."""

from __future__ import annotations

import asyncio
import secrets
import time
import weakref
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from agent import logs
from agent.web.config import WebConfig
from agent.web.render import message, page
from agent.web.signin.oidc import OidcClient, OidcError, Pending, Tokens, claims_of, refresh_due
from agent.web.signin.sessions import ROTATE, csrf_ok
from agent.web.store_client import StoreClient, StoreRefused

log = logs.get_logger(__name__)
PENDING = "signin"  # the session key of a sign-in under way
# One refresh at a time per session (the player sends ranges in parallel).
_REFRESHING: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def oidc_client(config: WebConfig) -> OidcClient | None:
    return OidcClient(config.oidc) if config.oidc is not None else None


def redirect_uri(request: Request, config: WebConfig) -> str:
    base = config.public_url or str(request.base_url)
    return base.rstrip("/") + "/auth/callback"


async def sign_in(request: Request) -> Response:
    app = request.app.state
    request.session.pop("person", None)
    if app.oidc is None:
        from agent.web.signin.local import sign_in_page

        return await sign_in_page(request)
    try:
        url, pending = await app.oidc.authorize_url(redirect_uri(request, app.config))
    except OidcError as exc:
        log.warning("web_provider_unavailable", error=str(exc)[:200])
        return message(request, 503, "no_access", "unavailable")
    request.session[PENDING] = pending.as_dict()
    return RedirectResponse(url, 302)


async def callback(request: Request) -> Response:
    state = request.app.state
    started = request.session.pop(PENDING, None)
    query = request.query_params
    given = query.get("state", "")
    if (
        not isinstance(started, dict)
        or not given
        or not secrets.compare_digest(given.encode(), str(started.get("state", "")).encode())
    ):
        log.info("web_sign_in_failed", error="no sign-in under way or another sign-in's state")
        return message(request, 400, "no_access", "session_over")
    if "error" in query or not query.get("code"):
        log.info("web_sign_in_failed", error=query.get("error", "no code")[:80])
        return message(request, 400, "no_access", "session_over")
    pending = Pending(str(started["state"]), str(started["nonce"]), str(started["verifier"]))
    try:
        tokens = await state.oidc.exchange(
            query["code"][:2048], redirect_uri(request, state.config), pending
        )
    except OidcError as exc:
        log.info("web_sign_in_failed", error=str(exc)[:200])
        return message(request, 400, "no_access", "session_over")
    return await establish(request, tokens)


def local_tokens(id_token: str) -> Tokens:
    """The demo's local sign-in: an ID token without a refresh token."""
    claims = claims_of(id_token)
    now = int(time.time())
    return Tokens(id_token, "", int(claims.get("iat", now)), int(claims.get("exp", now)))


async def establish(request: Request, tokens: Tokens) -> Response:
    """Ask the store who the ID token names; a session only for a trained person."""
    store: StoreClient = request.app.state.store
    try:
        person = await store.whoami(tokens.id_token)
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
        purposes={},
        key=secrets.token_hex(8),
    )
    _keep(request.session, tokens)
    request.session[ROTATE] = True
    log.info("web_signed_in", person=person.id, role=person.role)
    return RedirectResponse("/search", 303)


def _keep(session: dict[str, Any], tokens: Tokens) -> None:
    session.update(
        id_token=tokens.id_token,
        refresh_token=tokens.refresh_token,
        id_iat=tokens.issued_at,
        id_exp=tokens.expires_at,
    )


async def bearer(request: Request) -> str:
    """The signed-in person's ID token for the store, refreshed first when it is about
    to expire and the provider gave a refresh token. A refresh the provider refuses
    (revoked, expired) ends the session once the ID token has run out."""
    session = request.session
    if not session.get("refresh_token") or not _due(session):
        return str(session["id_token"])
    lock = _REFRESHING.get(session["key"])
    if lock is None:
        lock = _REFRESHING[session["key"]] = asyncio.Lock()
    async with lock:
        if not _due(session):  # another request of this session has just refreshed
            return str(session["id_token"])
        oidc: OidcClient = request.app.state.oidc
        try:
            tokens = await oidc.refresh(session["refresh_token"])
        except OidcError as exc:
            log.info("web_refresh_failed", person=session["person"]["id"], error=str(exc)[:200])
            if time.time() < session.get("id_exp", 0):
                return str(session["id_token"])
            session.clear()
            raise StoreRefused(grpc.StatusCode.UNAUTHENTICATED, "ID token expired") from None
        _keep(session, tokens)
        log.info("web_token_refreshed", person=session["person"]["id"])
        return tokens.id_token


def _due(session: dict[str, Any]) -> bool:
    return refresh_due(int(session.get("id_iat", 0)), int(session.get("id_exp", 0)), time.time())


async def sign_out(request: Request) -> Response:
    form = await request.form()
    if not csrf_ok(request.session, str(form.get("csrf", ""))):
        return message(request, 403, "no_access", "csrf")
    person = request.session.get("person") or {}
    refresh = str(request.session.get("refresh_token", ""))
    request.session.clear()
    oidc: OidcClient | None = request.app.state.oidc
    revoked = bool(oidc is not None and refresh and await oidc.revoke(refresh))
    log.info("web_signed_out", person=person.get("id", "-"), revoked=revoked)
    return page(request, "message.html", title_key="sign_out", text_key="signed_out", home=True)
