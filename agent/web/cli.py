"""``callrec web --config web.toml``: the people's web (its own process)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.config import ConfigError
from agent.web.config import WebConfig


def add_parsers(sub: Any) -> None:
    web = sub.add_parser("web", help="run the people's web (HTTPS, OpenID Connect sign-in)")
    web.add_argument("--config", type=Path, required=True)
    web.add_argument(
        "--check", action="store_true", help="check the config and the files it names, then exit"
    )


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "web":
        return None
    from agent import logs
    from agent.web.config import load_web_config
    from agent.web.server import serve

    config = load_web_config(args.config)
    if args.check:
        check_files(config)
        sys.stdout.write(f"callrec web: {args.config} ok\n")
        return 0
    logs.configure(config.log_level, identifier="callrec-web")
    serve(config)
    return 0


def check_files(config: WebConfig) -> None:
    """Every file the config names can be read (else ConfigError naming the key)."""
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
