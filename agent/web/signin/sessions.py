"""Server-side sessions: the browser holds only a random id in an HttpOnly, Secure,
SameSite=Lax cookie; the person's tokens stay on the server. A session unused for
``idle_s`` is gone; signing in issues a new id (no fixation); signing out forgets it.

With ``[web] state_dir`` the sessions are also kept in ``sessions.db`` there (SQLite,
mode 0600), so a restart of the web signs nobody out: each row is keyed by the SHA-256
of the session id (the file alone opens no session) and signed with HMAC-SHA256 under
``session.key`` (made at first start, mode 0600); a row that does not verify is
dropped. The last use is written at most once a minute, so the idle timeout holds
across a restart to within a minute. Without ``state_dir`` sessions live in memory.

Lax, not Strict: the OpenID provider's redirect back to ``/auth/callback`` is a
cross-site top-level navigation, and the sign-in state must come with it. Every state
change is a POST with the session's CSRF token, which Lax cookies never reach from
another site anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import logs

log = logs.get_logger(__name__)

COOKIE = "__Host-callrec"
ROTATE = "_rotate"  # set in the session to issue a new id (after sign-in)
MAX_SESSIONS = 10_000
SEEN_WRITE_S = 60.0  # the last use goes to disk at most this often per session


class _Entry:
    __slots__ = ("data", "seen", "written")

    def __init__(self, data: dict[str, Any], seen: float, written: float) -> None:
        self.data, self.seen, self.written = data, seen, written


class SessionStore:
    def __init__(
        self, idle_s: float, state_dir: Path | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.idle_s = idle_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _Entry] = {}  # by the SHA-256 of the session id
        self._disk = _Disk(state_dir) if state_dir is not None else None
        if self._disk is not None:
            now = clock()
            for key, seen, data in self._disk.load():
                if now - seen <= idle_s:
                    self._sessions[key] = _Entry(data, seen, seen)
            self._disk.keep_only(set(self._sessions))
            log.info("web_sessions_loaded", sessions=len(self._sessions))

    def get(self, sid: str) -> dict[str, Any] | None:
        now, key = self.clock(), _key(sid)
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                return None
            if now - found.seen > self.idle_s:
                self._forget(key)
                return None
            found.seen = now
            if self._disk is not None and now - found.written >= SEEN_WRITE_S:
                found.written = now
                self._disk.write(key, now, found.data)
            return found.data

    def put(self, data: dict[str, Any]) -> str:
        sid = secrets.token_urlsafe(32)
        now, key = self.clock(), _key(sid)
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._expire(now)
            self._sessions[key] = _Entry(data, now, now)
            if self._disk is not None:
                self._disk.write(key, now, data)
        return sid

    def save(self, sid: str) -> None:
        """Write a session whose contents changed during a request."""
        key = _key(sid)
        with self._lock:
            found = self._sessions.get(key)
            if found is not None and self._disk is not None:
                found.written = found.seen
                self._disk.write(key, found.seen, found.data)

    def drop(self, sid: str) -> None:
        with self._lock:
            self._forget(_key(sid))

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()

    def _forget(self, key: str) -> None:
        if self._sessions.pop(key, None) is not None and self._disk is not None:
            self._disk.delete(key)

    def _expire(self, now: float) -> None:
        for key, entry in list(self._sessions.items()):
            if now - entry.seen > self.idle_s:
                self._forget(key)
        if len(self._sessions) >= MAX_SESSIONS:
            # Still full (a flood of sign-in starts): sessions of nobody signed in go
            # first, oldest first; a signed-in person's session only after them.
            def rank(key: str) -> tuple[bool, float]:
                entry = self._sessions[key]
                return ("person" in entry.data, entry.seen)

            self._forget(min(self._sessions, key=rank))


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class _Disk:
    """``sessions.db`` in the state directory, each row signed under ``session.key``."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._secret = _secret(state_dir / "session.key")
        path = state_dir / "sessions.db"
        try:
            self._db = _connect(path)
        except sqlite3.DatabaseError as exc:
            # Not a database (a damaged file): set aside, start with no sessions.
            aside = path.with_name(f"sessions.db.damaged-{int(time.time())}")
            log.warning("web_sessions_damaged", error=str(exc)[:200], moved_to=str(aside))
            path.replace(aside)
            self._db = _connect(path)

    def _mac(self, key: str, seen: float, data: str) -> str:
        message = f"{key}\n{seen!r}\n{data}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def load(self) -> list[tuple[str, float, dict[str, Any]]]:
        rows = []
        for key, seen, data, mac in self._db.execute("SELECT key, seen, data, mac FROM sessions"):
            if not hmac.compare_digest(str(mac), self._mac(str(key), float(seen), str(data))):
                log.warning("web_session_forged", reason="signature does not verify")
                continue
            try:
                rows.append((str(key), float(seen), dict(json.loads(data))))
            except (ValueError, TypeError):
                log.warning("web_session_unreadable")
        return rows

    def keep_only(self, keys: set[str]) -> None:
        stored = [str(k) for (k,) in self._db.execute("SELECT key FROM sessions")]
        self._db.executemany(
            "DELETE FROM sessions WHERE key = ?", [(k,) for k in stored if k not in keys]
        )

    def write(self, key: str, seen: float, data: dict[str, Any]) -> None:
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO sessions (key, seen, data, mac) VALUES (?, ?, ?, ?)",
                (key, seen, text, self._mac(key, seen, text)),
            )
        except sqlite3.Error as exc:  # a full disk: the session lives on in memory
            log.warning("web_session_not_saved", error=str(exc)[:200])

    def delete(self, key: str) -> None:
        try:
            self._db.execute("DELETE FROM sessions WHERE key = ?", (key,))
        except sqlite3.Error as exc:
            log.warning("web_session_not_deleted", error=str(exc)[:200])

    def close(self) -> None:
        self._db.close()


def _connect(path: Path) -> sqlite3.Connection:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS sessions"
            " (key TEXT PRIMARY KEY, seen REAL NOT NULL, data TEXT NOT NULL, mac TEXT NOT NULL)"
        )
        db.execute("SELECT count(*) FROM sessions").fetchone()
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _secret(path: Path) -> bytes:
    """The signing key, made on first use (32 random bytes, mode 0600)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise OSError(f"{path}: shorter than 32 bytes; remove it to make a new one") from None
        return secret
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(32))
    return path.read_bytes()


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
        before = _snapshot(session)
        scope["session"] = session

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = self._cookie_header(sid if found is not None else "", session)
                if header:
                    message.setdefault("headers", []).append((b"set-cookie", header.encode()))
                elif found is not None and session and _snapshot(session) != before:
                    self.store.save(sid)  # e.g. a purpose chosen, a refreshed ID token
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


def _snapshot(session: dict[str, Any]) -> str:
    return json.dumps(session, sort_keys=True, default=str)


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
