"""The control API's integration tokens, hashed at rest.

``[control] tokens_file`` holds one ``<integration> <sha256 hex of the token>`` per
line (``#`` comments); ``callrec control token NAME --tokens-file FILE`` makes a token,
appends its hash and prints the token once. A request's bearer token is hashed and
looked up; the integration's name is what the log and the pauses' ``who`` say.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from agent.config import ConfigError

_NAME = re.compile(r"[A-Za-z0-9._-]{1,40}")
_HEX = re.compile(r"[0-9a-f]{64}")
MAX_TOKEN_CHARS = 200


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Tokens:
    by_digest: dict[str, str]  # sha256 hex → integration name

    @classmethod
    def load(cls, path: Path | None) -> Tokens:
        if path is None:
            return cls({})
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"[control] tokens_file = {str(path)!r}: {exc.strerror}") from None
        found: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 2 or not _NAME.fullmatch(parts[0]) or not _HEX.fullmatch(parts[1]):
                raise ConfigError(
                    f"[control] tokens_file = {str(path)!r} line {number}: expected "
                    "'<integration> <sha256 hex>' (make one with `callrec control token`)"
                )
            found[parts[1]] = parts[0]
        return cls(found)

    def integration(self, token: str) -> str | None:
        """The integration whose token this is, or None."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        wanted = digest(token)
        for known, name in self.by_digest.items():
            if hmac.compare_digest(known, wanted):
                return name
        return None


def new_token(name: str, path: Path) -> str:
    """A fresh token for integration ``name``: its hash appended to ``path``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"integration name {name!r}: expected letters, digits, '.', '_', '-'")
    Tokens.load(path if path.exists() else None)  # refuses a broken file first
    token = secrets.token_urlsafe(32)
    with path.open("a") as fh:
        fh.write(f"{name} {digest(token)}\n")
    path.chmod(0o640)
    return token
