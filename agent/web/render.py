"""Pages: Jinja2 templates in the person's language, and the headers every response
carries (a strict Content-Security-Policy: no inline script or style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.web.i18n import pick_language, translator
from agent.web.signin.sessions import csrf_token

HERE = Path(__file__).resolve().parent
TEMPLATES = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,  # templates change with a new release, which restarts the web
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]


def language(request: Request) -> str:
    return pick_language(request.headers.get("accept-language", ""))


def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    lang = language(request)
    session = request.session
    person = session.get("person")
    html = TEMPLATES.get_template(template).render(
        t=translator(lang),
        lang=lang,
        person=person,
        csrf=csrf_token(session) if person else "",
        **context,
    )
    return HTMLResponse(html, status_code, headers={"cache-control": "no-store"})


def message(request: Request, status_code: int, title_key: str, text_key: str) -> HTMLResponse:
    return page(request, "message.html", status_code, title_key=title_key, text_key=text_key)


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg.setdefault("headers", []).extend(SECURITY_HEADERS)
            await send(msg)

        await self.app(scope, receive, send_with_headers)
