"""`callrec --help` lists what an operator runs (not the agent's internal `worker`), and
every option and argument of every command says what it is for."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from agent.cli.main import _parser

CALLREC = str(Path(sys.executable).parent / "callrec")


def _undocumented(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _undocumented(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            yield f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_every_option_has_help() -> None:
    assert list(_undocumented(_parser(), "callrec")) == []


def test_worker_is_left_out_of_help() -> None:
    shown = subprocess.run(
        [CALLREC, "--help"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert "worker" not in shown
    assert "quarantine" in shown and "console-list" in shown
    worker = subprocess.run(
        [CALLREC, "worker", "--help"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert "--ready-fd" in worker


def _options(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _options(child, f"{path} {name}")
        else:
            yield path, action


def test_options_with_a_fixed_set_of_values_list_them() -> None:
    """A purpose, a recording flag, a config kind: argparse choices, so the help and
    the error for a wrong value list them."""
    fixed = {"purpose", "flag", "kind"}
    plain = [
        f"{path} {action.dest}"
        for path, action in _options(_parser(), "callrec")
        if action.dest in fixed and not action.choices
    ]
    assert plain == []
    assert sum(1 for _, a in _options(_parser(), "callrec") if a.dest in fixed) > 15
