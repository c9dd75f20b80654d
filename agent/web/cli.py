"""``callrec web --config web.toml``: the people's web (its own process)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agent.config import ConfigError
from agent.web.config import WebConfig


def add_parsers(sub: Any) -> None:
    web = sub.add_parser("web", help="run the people's web (HTTPS, OpenID Connect sign-in)")
    web.add_argument("--config", type=Path, required=True, help="the web's config")
    web.add_argument(
        "--check", action="store_true", help="check the config and the files it names, then exit"
    )


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "web":
        return None
    from agent.web.config import load_web_config

    config = load_web_config(args.config)
    check_files(config)
    if args.check:
        sys.stdout.write(f"callrec web: {args.config} ok\n")
        return 0
    # The server in a fresh interpreter (same pid: systemd and the tests see one
    # process): it imports only the web's modules, not the CLI's.
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "agent.web", "--config", str(args.config)]
    os.execv(sys.executable, argv)  # noqa: S606 (this interpreter, fixed arguments)


def check_files(config: WebConfig) -> None:
    """Every file the config names can be read and the state directory written (else
    ConfigError naming the key)."""
    named = {
        "[web] tls_cert": config.tls_cert,
        "[web] tls_key": config.tls_key,
        "[web] store_ca_file": config.store_ca_file,
        "[web.oidc] client_secret_file": config.oidc.client_secret_file if config.oidc else None,
        "[web.oidc] ca_file": config.oidc.ca_file if config.oidc else None,
    }
    for key, path in named.items():
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key} = {str(path)!r}: cannot be read ({exc.strerror})") from None
    if config.state_dir is not None:
        check_state_dir(config.state_dir)


def check_state_dir(state_dir: Path) -> None:
    """The sessions' directory exists (or can be made) and this user can write in it."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = state_dir / ".callrec-web-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"[web] state_dir = {str(state_dir)!r}: cannot be written ({exc.strerror}); "
            "the web's user keeps its sessions there"
        ) from None
