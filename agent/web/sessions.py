"""Server-side sessions: the browser holds only a random id in an HttpOnly, Secure,
SameSite=Lax cookie; the person's ID token stays in this process's memory. A session
unused for ``idle_s`` is gone; signing in issues a new id (no fixation); signing out
forgets it. A restart of the web signs everyone out (nothing is written to disk).

Lax, not Strict: the OpenID provider's redirect back to ``/auth/callback`` is a
cross-site top-level navigation, and the sign-in state must come with it. Every state
change is a POST with the session's CSRF token, which Lax cookies never reach from
another site anyway.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "__Host-callrec"
ROTATE = "_rotate"  # set in the session to issue a new id (after sign-in)
MAX_SESSIONS = 10_000


class SessionStore:
    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[float, dict[str, Any]]] = {}

    def get(self, sid: str) -> dict[str, Any] | None:
        now = self.clock()
        with self._lock:
            found = self._sessions.get(sid)
            if found is None:
                return None
            if now - found[0] > self.idle_s:
                del self._sessions[sid]
                return None
            self._sessions[sid] = (now, found[1])
            return found[1]

    def put(self, data: dict[str, Any]) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._expire(now)
            self._sessions[sid] = (now, data)
        return sid

    def drop(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def _expire(self, now: float) -> None:
        for sid, (seen, _) in list(self._sessions.items()):
            if now - seen > self.idle_s:
                del self._sessions[sid]
        if len(self._sessions) >= MAX_SESSIONS:
            # Still full (a flood of sign-in starts): sessions of nobody signed in go
            # first, oldest first; a signed-in person's session only after them.
            def rank(sid: str) -> tuple[bool, float]:
                seen, data = self._sessions[sid]
                return ("person" in data, seen)

            del self._sessions[min(self._sessions, key=rank)]


def csrf_token(session: dict[str, Any]) -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_ok(session: dict[str, Any], given: str) -> bool:
    token = session.get("csrf")
    return isinstance(token, str) and bool(given) and hmac.compare_digest(token, given)


class SessionMiddleware:
    """Puts the session dict in ``scope["session"]`` (what ``request.session`` reads)
    and writes the cookie when a session begins, is renewed or ends."""

    def __init__(self, app: ASGIApp, store: SessionStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sid = _cookie(scope)
        found = self.store.get(sid) if sid else None
        session: dict[str, Any] = found if found is not None else {}
        scope["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = self._cookie_header(sid if found is not None else "", session)
                if header:
                    message.setdefault("headers", []).append((b"set-cookie", header.encode()))
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _cookie_header(self, sid: str, session: dict[str, Any]) -> str:
        if sid and (not session or session.get(ROTATE)):
            self.store.drop(sid)
            sid = ""
            if not session:
                return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax"
        if sid or not session:
            return ""
        session.pop(ROTATE, None)
        new = self.store.put(session)
        return f"{COOKIE}={new}; Path=/; HttpOnly; Secure; SameSite=Lax"


def _cookie(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001  (a malformed cookie header is no session)
                return ""
            morsel = jar.get(COOKIE)
            return morsel.value if morsel else ""
    return ""
