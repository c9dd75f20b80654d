"""The web application: routes, middleware, start-up and shut-down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.web import audio, audit_view, cases, pages
from agent.web.config import WebConfig
from agent.web.render import HERE, SecurityHeaders, page
from agent.web.signin import auth, local
from agent.web.signin.sessions import SessionMiddleware, SessionStore
from agent.web.store_client import StoreClient


async def home(request: Request) -> Response:
    if request.session.get("person"):
        return RedirectResponse("/search", 303)
    return page(request, "home.html")


def create_app(config: WebConfig) -> Starlette:
    sessions = SessionStore(config.session_idle_s, config.state_dir)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.config = config
        app.state.store = StoreClient(config)
        app.state.oidc = auth.oidc_client(config)
        app.state.local = local.issuer(config)
        try:
            yield
        finally:
            await app.state.store.close()
            sessions.close()

    routes = [
        Route("/", home),
        Route("/signin", auth.sign_in),
        Route("/auth/callback", auth.callback),
        Route("/signout", auth.sign_out, methods=["POST"]),
        Route("/search", pages.search, methods=["GET", "POST"]),
        Route("/recordings/{rid}", pages.recording),
        Route("/recordings/{rid}/purpose", pages.choose_purpose, methods=["POST"]),
        Route("/recordings/{rid}/audio", audio.audio),
        Route("/recordings/{rid}/waveform", audio.waveform),
        Route("/local/.well-known/openid-configuration", local.discovery),
        Route("/local/jwks", local.jwks),
        Route("/local/signin", local.sign_in, methods=["POST"]),
        Route("/audit", audit_view.audit),
        Route("/audit.csv", audit_view.audit_csv),
        Route("/cases", cases.case_form),
        Route("/cases/find", cases.find, methods=["POST"]),
        Route("/cases/action", cases.act, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(SessionMiddleware, store=sessions),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
