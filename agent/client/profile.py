"""The people's CLI profile: ``~/.config/callrec/client.toml`` (or ``$XDG_CONFIG_HOME``,
or the file ``$CALLREC_CLIENT_CONFIG`` names) holds what a supervisor would otherwise
type on every command: the store's address, its CA, where the token comes from and the
usual purpose. Explicit flags win over it; every key is in ``agent.config.reference``.

    [client]
    store = "store.example:50052"
    ca_file = "ca.pem"                        # beside this file unless absolute
    token_command = "pass show callrec/token"
    purpose = "verification"
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.parsing import (
    ConfigError,
    _collecting,
    _load_toml,
    _optional_path,
    _optional_text,
    _sections,
)

PURPOSE_NAMES = ("legal", "security", "training", "verification")
DEFAULT_STORE = "127.0.0.1:50051"
TOKEN_COMMAND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ClientProfile:
    path: Path
    store: str = DEFAULT_STORE
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token_file: Path | None = None
    token_command: str | None = None
    purpose: str | None = None

    def token(self) -> str | None:
        """The token from ``token_file`` or ``token_command`` (None: neither is set);
        a ConfigError naming this file and the key when it can't be had."""
        if self.token_file is not None:
            try:
                mode = self.token_file.stat().st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    why = f"readable by group or others (mode {stat.S_IMODE(mode):o}); chmod 600"
                    raise self._error("token_file", str(self.token_file), why)
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise self._error("token_file", str(self.token_file), exc.strerror) from None
        if self.token_command is None:
            return None
        return self._run_token_command(self.token_command)

    def _run_token_command(self, command: str) -> str:
        try:
            done = subprocess.run(
                shlex.split(command),
                capture_output=True,
                text=True,
                timeout=TOKEN_COMMAND_TIMEOUT_S,
                check=False,
            )
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise self._error("token_command", command, why) from None
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [""])[-1][:200]
            raise self._error("token_command", command, f"exited {done.returncode} {said}")
        return done.stdout.strip()

    def _error(self, key: str, value: str, why: str | None) -> ConfigError:
        return ConfigError(f"{self.path}: [client] {key} = {value!r}: {why}")


def profile_path() -> Path:
    """``$CALLREC_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/callrec/client.toml``, else
    ``~/.config/callrec/client.toml``."""
    if named := os.environ.get("CALLREC_CLIENT_CONFIG"):
        return Path(named).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "callrec" / "client.toml"


def load_profile() -> ClientProfile | None:
    """The profile, or None when the default file does not exist (a file named by
    ``$CALLREC_CLIENT_CONFIG`` must). A bad key: ConfigError naming the file and key."""
    path = profile_path()
    if not path.exists() and not os.environ.get("CALLREC_CLIENT_CONFIG"):
        return None
    try:
        return profile_from_dict(_load_toml(path), path)
    except ConfigError as exc:
        text = str(exc)
        raise ConfigError(text if text.startswith(str(path)) else f"{path}: {text}") from None


@_collecting
def profile_from_dict(doc: Mapping[str, Any], path: Path) -> ClientProfile:
    c = _sections(doc, ("client",), path.resolve().parent)["client"]
    purpose = c.text("purpose", "", choices=PURPOSE_NAMES) if "purpose" in c.table else None
    profile = ClientProfile(
        path=path,
        store=c.text("store", DEFAULT_STORE),
        ca_file=_optional_path(c, "ca_file"),
        cert_file=_optional_path(c, "cert_file"),
        key_file=_optional_path(c, "key_file"),
        token_file=_optional_path(c, "token_file"),
        token_command=_optional_text(c, "token_command", "") or None,
        purpose=purpose,
    )
    if profile.token_file is not None and profile.token_command is not None:
        raise c._fail("token_command", profile.token_command, "no token_file beside it")
    c.check_unknown()
    return profile
