"""What an operator installing callrec checks first: the version it reports, the example
configs the package puts in /etc/callrec (they load, and `callrec check` passes once the
keys and certificates they name are made as their comments say), and that the demo is
left out of an installation without the test-call harness."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.config import load_agent_config, load_store_config
from agent.directory import Directory
from agent.web.config import load_web_config
from tests.support.daemons import REPO

EXAMPLES = REPO / ".debian" / "examples"
CALLREC = [sys.executable, "-m", "agent.cli"]


def _callrec(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CALLREC, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_version_is_the_installed_distributions() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    result = _callrec("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"callrec {project['version']}\n"


def test_every_example_is_shipped_and_loads() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.toml.example"))
    assert names == [
        "agent.toml.example",
        "people.toml.example",
        "store.toml.example",
        "web.toml.example",
    ]
    agent = load_agent_config(EXAMPLES / "agent.toml.example")
    store = load_store_config(EXAMPLES / "store.toml.example")
    people = Directory.load(EXAMPLES / "people.toml.example")
    web = load_web_config(EXAMPLES / "web.toml.example")
    assert web.oidc is not None and web.store_ca_file is not None
    assert web.store_address.endswith(store.access_listen.rpartition(":")[2])
    assert agent.directory_file == store.directory_file == Path("/etc/callrec/people.toml")
    assert agent.data_dir == Path("/var/lib/callrec-agent")
    assert store.data_dir == Path("/var/lib/callrec-store")
    assert {p.role.value for p in people.people.values()} >= {"agent", "supervisor"}


def test_check_passes_on_the_examples_after_the_documented_steps(tmp_path: Path) -> None:
    """The examples' comments: `callrec keys init /etc/callrec/keys`, `keys master
    init`, a CA with `callrec certs`, then `callrec check`. Here /etc/callrec is a
    temporary folder, and so is /var/lib."""
    etc = tmp_path / "etc-callrec"
    etc.mkdir()
    for example in EXAMPLES.glob("*.toml.example"):
        text = example.read_text().replace("/etc/callrec/", f"{etc}/")
        text = text.replace("/var/lib/", f"{tmp_path}/var-lib-")
        (etc / example.name.removesuffix(".example")).write_text(text)
    for step in (
        ["keys", "init", f"{etc}/keys"],
        ["keys", "master", "init", "--config", f"{etc}/store.toml"],
        ["certs", "ca", f"{etc}/tls"],
        ["certs", "store", f"{etc}/tls", "--host", "store.example"],
        ["certs", "agent", f"{etc}/tls", "--site", "hel-1"],
    ):
        done = _callrec(*step)
        assert done.returncode == 0, done.stderr
    for kind in ("agent", "store"):
        checked = _callrec("check", f"--{kind}", str(etc / f"{kind}.toml"))
        assert (checked.returncode, checked.stdout) == (0, "ok\n"), checked.stderr


def test_check_names_a_missing_key_file_of_an_example() -> None:
    """Unchanged examples on a host without keys: one line per missing file, not ok."""
    checked = _callrec("check", "--agent", str(EXAMPLES / "agent.toml.example"))
    assert checked.returncode == 1
    assert "/etc/callrec/keys/seal.pub.pem" in checked.stderr
    assert checked.stdout == ""


# Run in a copy of agent/ without testcall: every module imported (the migrations' env
# is alembic's script, not a module), then `callrec --help` and `callrec demo`. The
# editable install's finder would find agent.testcall in the checkout: it is removed.
WITHOUT_HARNESS = """
import importlib, json, pkgutil, sys
sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith("__editable__")]
import agent
assert agent.__file__.startswith(sys.argv[1]), agent.__file__
names = [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")
         if not m.name.endswith(".__main__") and ".migrations" not in m.name]
for name in names:
    importlib.import_module(name)
from agent.cli.main import main
codes = []
for argv in (["--help"], ["demo"]):
    try:
        main(argv)
    except SystemExit as exited:
        codes.append(exited.code)
print(json.dumps({"imported": names, "codes": codes}))
"""


@pytest.mark.sip  # every module is imported, pjsua2's adapter too: no cp313 wheel
def test_the_package_without_the_harness_imports_and_offers_no_demo(tmp_path: Path) -> None:
    """The Debian package leaves agent/testcall (the demo and its test-call harness) out
    (checked on the installed package in test_deb.py): no other module may need it, and
    without it there is no `demo` command."""
    shutil.copytree(
        REPO / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("testcall", "__pycache__")
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", WITHOUT_HARNESS, str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    *shown, result = done.stdout.splitlines()
    outcome = json.loads(result)
    assert {"agent.cli.main", "agent.recorder.worker", "agent.store.server"} <= set(
        outcome["imported"]
    )
    assert not [name for name in outcome["imported"] if "testcall" in name]
    assert outcome["codes"] == [0, 2]
    assert "invalid choice: 'demo'" in done.stderr
    assert "store" in "\n".join(shown) and "demo" not in "\n".join(shown)


@pytest.mark.parametrize("command", [["demo", "--help"], ["--help"]])
def test_demo_is_offered_in_a_source_checkout(command: list[str]) -> None:
    result = _callrec(*command)
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_agent_without_pjsua2_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python 3.13 has no pjsua2 wheel: `callrec agent` refuses with one line, exit 2."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "pjsua2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert cli.main(["agent", "--config", str(EXAMPLES / "agent.toml.example")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("callrec agent: pjsua2 is not installed for Python 3.")
    assert err.count("\n") == 1
