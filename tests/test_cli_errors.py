"""An operator's mistake (a missing socket, token, CA or key file, a key path that is a
directory or unreadable, an unreadable config) gets one line on stderr saying what to fix,
and exit code 2 — never a traceback. The real ``callrec`` command is run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import make_keys

CALLREC = str(Path(sys.executable).parent / "callrec")
NOBODY = 65534


def _run(*args: str, env: dict[str, str] | None = None, other_user: bool = False) -> list[str]:
    """Run ``callrec`` (as another user than the files' owner when asked); return
    stderr's lines after asserting exit code 2."""
    command = [CALLREC, *args]
    if other_user and os.geteuid() == 0:  # root reads anything: run as nobody
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        command += [CALLREC, *args]
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.splitlines()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="callrec-errors-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _store_toml(root: Path, seal_key: Path) -> Path:
    path = root / "store.toml"
    path.write_text(
        f'[store]\ndata_dir = "{root / "data"}"\nseal_key_file = "{seal_key}"\n'
        "[store.tls]\ninsecure = true\n"
    )
    path.chmod(0o644)
    return path


def test_console_socket_missing(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    lines = _run("console-list", "--store-dir", str(tmp_path / "store"))
    assert len(lines) == 1
    assert "console.sock: no console socket" in lines[0]
    assert "callrec store" in lines[0]


@pytest.mark.parametrize("option", ["--ca-file", "--token-file"])
def test_people_cli_file_missing(tmp_path: Path, option: str) -> None:
    missing = tmp_path / "nowhere" / "file.pem"
    lines = _run(
        "search", option, str(missing), "--purpose", "legal", env={"CALLREC_TOKEN": "t0ken"}
    )
    assert lines == [f"callrec search: {missing}: not found; check the path"]


def test_key_path_is_a_directory(tmp_path: Path) -> None:
    key_dir = tmp_path / "seal.pem"
    key_dir.mkdir(mode=0o700)
    lines = _run("check", "--store", str(_store_toml(tmp_path, key_dir)))
    assert lines == [f"callrec check: {key_dir}: is a directory; give the file's path"]


def test_key_file_unreadable(shared_dir: Path) -> None:
    own = make_keys(shared_dir / "keys")
    own.directory.chmod(0o755)
    if os.geteuid() != 0:
        own.seal_private.chmod(0o000)
    config = _store_toml(shared_dir, own.seal_private)
    lines = _run("check", "--store", str(config), other_user=True)
    assert len(lines) == 1
    assert lines[0].startswith(f"callrec check: {own.seal_private}: permission denied")


def test_config_file_unreadable(shared_dir: Path) -> None:
    config = _store_toml(shared_dir, shared_dir / "seal.pem")
    config.chmod(0o600 if os.geteuid() == 0 else 0o000)
    lines = _run("check", "--store", str(config), other_user=True)
    assert lines == [f"callrec check: {config}: config file can't be read: Permission denied"]
