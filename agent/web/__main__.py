"""``python -m agent.web --config web.toml``: the web server alone. ``callrec web``
checks the config, then replaces itself with this (exec, same process id), so the
serving process carries only what the web imports, not the whole CLI (SQLAlchemy,
Alembic, the recorder: ~30 MiB the web never uses)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent import logs
from agent.config import ConfigError
from agent.web.config import load_web_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callrec web")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_web_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"callrec web: {exc}\n")
        return 2
    logs.configure(config.log_level, identifier="callrec-web")
    from agent.web.server import serve

    serve(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
