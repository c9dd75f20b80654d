"""``callrec web --config web.toml``: the people's web (its own process)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    web = sub.add_parser("web", help="run the people's web (HTTPS, OpenID Connect sign-in)")
    web.add_argument("--config", type=Path, required=True)


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "web":
        return None
    from agent import logs
    from agent.web.config import load_web_config
    from agent.web.server import serve

    config = load_web_config(args.config)
    logs.configure(config.log_level, identifier="callrec-web")
    serve(config)
    return 0
