"""``python -m agent.cli`` is ``callrec`` (how tests and the demo start it from a checkout)."""

from agent.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
