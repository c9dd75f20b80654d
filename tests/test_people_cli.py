"""The people's CLI as a supervisor and the privacy officer use it, against a real store
on a loopback port: the profile (~/.config/callrec/client.toml) instead of five flags,
flags still winning, errors naming the file and key; --json/--csv with stable field
names and never a full number; the `dsr` group and its old spellings; a progress line on
a terminal only; options with a fixed set of values listing them."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.cli.tabular import size_text
from agent.client import audit as audit_cli
from agent.client.options import FLAG_NAMES, VIEW_FIELDS
from tests.support.access_world import CUSTOMER, World, running_world
from tests.support.services import write_store_toml
from tests.support.stack import make_keys

CALLREC = str(Path(sys.executable).parent / "callrec")
# The stable field names of a listed recording (README, "Listings"): scripts rely on them.
RECORDING_FIELDS = (
    "recording_id", "started_at", "ended_at", "duration_s", "direction", "site",
    "service_number", "customer_masked", "employee_ids", "employee_names", "audio_format",
    "channels", "flags",
)  # fmt: skip
MARKS = ("restricted", "legal_hold", "destroy_after")
FULL_DIGITS = "401234567"  # the customer's number without its country code


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("people-cli")
    yield from running_world(root, make_keys(root / "keys"))


@pytest.fixture(scope="module")
def calls(world: World) -> dict[str, str]:
    return {
        "a1": world.seed([("a1", "Aino Agent", "parcels")]),
        "a2": world.seed([("a2", "Mikko Agent", "telesales")]),
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A person's config home with no profile yet, and no token in the environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("CALLREC_CLIENT_CONFIG", raising=False)
    for name in ("CALLREC_TOKEN", "CALLREC_STORE", "CALLREC_CA_FILE", "CALLREC_PURPOSE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config" / "callrec").mkdir(parents=True)
    return tmp_path


def _profile(home: Path, text: str) -> Path:
    path = home / "config" / "callrec" / "client.toml"
    path.write_text("[client]\n" + text)
    return path


def _token_file(home: Path, world: World, person: str) -> Path:
    path = home / f"{person}.token"
    path.write_text(world.tokens[person] + "\n")
    path.chmod(0o600)
    return path


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- the profile


def test_the_profile_replaces_the_flags(
    world: World, calls: dict[str, str], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The telesales supervisor types `callrec search --json`; store, token (from a
    command) and purpose come from the profile."""
    token = _token_file(home, world, "s2")
    _profile(
        home,
        f'store = "{world.store.address}"\ntoken_command = "cat {token}"\n'
        'purpose = "verification"\n',
    )
    code, out, err = _main(capsys, "search", "--json")
    assert (code, err) == (0, "")
    found = {row["recording_id"] for row in json.loads(out)}
    assert calls["a2"] in found and calls["a1"] not in found


def test_flags_win_over_the_profile(
    world: World, calls: dict[str, str], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s2 = _token_file(home, world, "s2")
    _profile(home, f'store = "127.0.0.1:1"\ntoken_file = "{s2}"\npurpose = "legal"\n')
    a1 = _token_file(home, world, "a1")
    code, out, err = _main(
        capsys, "search", "--json", "--store", world.store.address,
        "--token-file", str(a1), "--purpose", "verification",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert {row["recording_id"] for row in json.loads(out)} == {calls["a1"]}
    code, _, err = _main(capsys, "search", "--token-file", str(a1), "--purpose", "verification")
    assert code == 1 and err.startswith("callrec search: UNAVAILABLE")  # the profile's store


def test_the_environment_wins_over_the_profile_and_flags_over_both(
    world: World,
    calls: dict[str, str],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _profile(home, 'store = "127.0.0.1:1"\npurpose = "legal"\n')
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["a1"])
    monkeypatch.setenv("CALLREC_STORE", world.store.address)
    monkeypatch.setenv("CALLREC_PURPOSE", "verification")
    code, out, err = _main(capsys, "search", "--json")
    assert (code, err) == (0, "")
    assert {row["recording_id"] for row in json.loads(out)} == {calls["a1"]}
    code, _, err = _main(capsys, "search", "--store", "127.0.0.1:1")
    assert code == 1 and err.startswith("callrec search: UNAVAILABLE")
    monkeypatch.setenv("CALLREC_PURPOSE", "curiosity")
    code, _, err = _main(capsys, "search")
    assert (code, err) == (
        2,
        "callrec search: $CALLREC_PURPOSE = 'curiosity': expected one of legal, security, "
        "training, verification\n",
    )


def test_data_subject_commands_keep_their_legal_purpose(
    world: World, calls: dict[str, str], home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A profile's everyday purpose does not turn the officer's hold into a
    verification (which the rules refuse)."""
    po = _token_file(home, world, "po")
    _profile(home, f'store = "{world.store.address}"\ntoken_file = "{po}"\npurpose = "training"\n')
    code, out, err = _main(capsys, "dsr", "hold", calls["a1"], "--reason", "case-7")
    assert (code, out, err) == (0, f"hold: {calls['a1']} done\n", "")
    code, out, _ = _main(capsys, "dsr", "release", calls["a1"], "--reason", "case-7")
    assert (code, out) == (0, f"release: {calls['a1']} done\n")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('purpose = "fun"\n', '[client] purpose = "fun": expected one of legal, security, '),
        ('stor = "x:1"\n', "[client] stor: unknown key"),
        ('token_command = "false"\n', "[client] token_command = 'false': exited 1"),
        ('token_command = "/nowhere/pass"\n', "[client] token_command = '/nowhere/pass': No "),
        ('token_file = "missing.token"\n', "missing.token': No such file or directory"),
        ('token_file = "open.token"\n', "open.token': readable by group or others (mode 644)"),
        ('token_file = "t"\ntoken_command = "cat t"\n', 'token_command = "cat t": expected no '),
        ("store = 5\n", "[client] store = 5: expected a non-empty string"),
    ],
)
def test_a_bad_profile_is_one_line_naming_the_file_and_key(
    home: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    (home / "config" / "callrec" / "open.token").write_text("crt1.x")
    (home / "config" / "callrec" / "open.token").chmod(0o644)
    path = _profile(home, text + 'purpose = "verification"\n' * ("purpose" not in text))
    code, out, err = _main(capsys, "search", "--store", "127.0.0.1:1")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(f"callrec search: {path}: "), err
    assert says in err


def test_without_profile_or_purpose_the_error_says_how(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _main(capsys, "search")
    assert code == 2
    assert err.startswith("callrec search: --purpose: required, one of legal, security, ")


def test_a_named_profile_must_exist(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CALLREC_CLIENT_CONFIG", str(home / "nowhere.toml"))
    code, _, err = _main(capsys, "search")
    assert code == 2 and f"{home / 'nowhere.toml'}: config file not found" in err


# ---------------------------------------------------------------- --json / --csv


def test_search_as_csv_and_json_has_stable_fields_and_masked_numbers(
    world: World,
    calls: dict[str, str],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _profile(home, f'store = "{world.store.address}"\npurpose = "security"\n')
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["ad"])
    code, out, _ = _main(capsys, "search", "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == VIEW_FIELDS == (*RECORDING_FIELDS, *MARKS)  # the README's
    mine = next(r for r in rows if r["recording_id"] == calls["a1"])
    assert mine["customer_masked"] == "+358401234***"
    assert mine["employee_ids"] == "a1" and mine["restricted"] == "false"
    code, out, _ = _main(capsys, "show", calls["a2"], "--json")
    [shown] = json.loads(out)
    assert list(shown) == list(VIEW_FIELDS) and shown["employee_names"] == ["Mikko Agent"]
    assert FULL_DIGITS not in out


def test_dsr_find_as_json_never_holds_the_number(
    world: World,
    calls: dict[str, str],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _profile(home, f'store = "{world.store.address}"\n')
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["po"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(CUSTOMER + "\n"))
    code, out, err = _main(
        capsys, "dsr", "find", "--json", "--at", _started_at(world, calls["a1"]),
        "--window", "30m", "--reason", "case-9",
    )  # fmt: skip
    assert code == 0, err
    found = json.loads(out)
    assert calls["a1"] in {r["recording_id"] for r in found}
    assert FULL_DIGITS not in out and FULL_DIGITS not in err
    assert err.endswith("recording(s) within ±30 min\n")  # the count, beside the data


def _started_at(world: World, rid: str) -> str:
    row = world.storage.catalog.get(rid)
    assert row is not None
    return dt.datetime.fromtimestamp(row.started_at_ms / 1000, dt.UTC).isoformat()


def test_token_list_as_json(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_store_toml(tmp_path / "store.toml", world.doc["store"])
    code, out, _ = _main(capsys, "access", "token", "list", "--config", str(config), "--json")
    assert code == 0
    tokens = json.loads(out)
    assert {t["person_id"] for t in tokens} >= {"a1", "s2", "po"}
    assert set(tokens[0]) == {
        "token_id", "person_id", "created_at", "expires_at", "last_used_at", "state"
    }  # fmt: skip
    assert all(t["state"] == "live" and t["created_at"].endswith("+00:00") for t in tokens)
    assert not any(world.tokens["a1"] in v for t in tokens for v in map(str, t.values()))


def test_console_list_as_csv(
    world: World, calls: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _main(capsys, "console-list", "--store-dir", str(world.config.data_dir), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == RECORDING_FIELDS
    assert {calls["a1"], calls["a2"]} <= {r["recording_id"] for r in rows}
    assert {r["customer_masked"] for r in rows} == {"+358401234***"}
    assert FULL_DIGITS not in out


def test_audit_log_as_json_and_csv(
    world: World,
    calls: dict[str, str],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The officer reads who looked at a recording; a supervisor may not read the log."""
    _profile(home, f'store = "{world.store.address}"\n')
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["ad"])
    assert _main(capsys, "show", calls["a2"], "--purpose", "security", "--reason", "INC-4")[0] == 0
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["po"])
    argv = ["audit", "log", "--recording", calls["a2"], "--purpose", "legal"]
    code, out, err = _main(capsys, *argv, "--json")
    assert (code, err) == (0, "")
    entries = json.loads(out)
    assert list(entries[0]) == list(audit_cli.FIELDS)
    seen = [(e["actor"], e["action"], e["outcome"], e["reason"]) for e in entries]
    assert ("person:ad", "get", "allowed", "INC-4") in seen
    code, out, _ = _main(capsys, *argv, "--csv", "--limit", "1")
    assert code == 0 and out.splitlines()[0] == ",".join(audit_cli.FIELDS)
    assert len(out.splitlines()) == 2
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["s1"])
    code, _, err = _main(capsys, *argv)
    assert code == 1 and err.startswith("callrec audit: PERMISSION_DENIED")


# ---------------------------------------------------------------- dsr and its old spellings


def test_dsr_groups_the_privacy_officers_tasks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.main(["dsr", "--help"])
    shown = capsys.readouterr().out
    for task in ("find", "export", "rectify", "erase", "restrict", "unrestrict", "hold"):
        assert f"\n    {task} " in shown or f"\n    {task}\n" in shown
    assert "release" in shown and "unseal" in shown and "Art. 17" in shown
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert "\n    dsr " in listed
    assert not any(f"\n    {old} " in listed for old in ("hold", "release", "rectify", "unseal"))


def test_an_old_spelling_works_and_says_it_is_deprecated(
    world: World,
    calls: dict[str, str],
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _profile(home, f'store = "{world.store.address}"\n')
    monkeypatch.setenv("CALLREC_TOKEN", world.tokens["po"])
    code, out, err = _main(capsys, "hold", calls["a2"], "--reason", "case-8")
    assert (code, out) == (0, f"hold: {calls['a2']} done\n")
    assert err == (
        "callrec hold: deprecated, use `callrec dsr hold` (the old spelling goes in a "
        "later release)\n"
    )
    code, out, _ = _main(capsys, "dsr", "release", calls["a2"], "--reason", "case-8")
    assert (code, out) == (0, f"release: {calls['a2']} done\n")


# ---------------------------------------------------------------- progress


def _callrec(world: World, person: str, argv: list[str], tty: bool) -> tuple[int, str]:
    """``callrec ARGV`` as ``person``, stderr a terminal (a pty) or a pipe; its stderr."""
    env = {**os.environ, "CALLREC_TOKEN": world.tokens[person], "CALLREC_CLIENT_CONFIG": ""}
    env["XDG_CONFIG_HOME"] = "/nonexistent"
    argv = [CALLREC, *argv]
    if not tty:
        done = subprocess.run(
            argv, check=False, env=env, capture_output=True, text=True, timeout=60
        )
        return done.returncode, done.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=follower) as proc:
        os.close(follower)
        seen = b""
        while select.select([leader], [], [], 60)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        code = proc.wait(timeout=60)
    os.close(leader)
    return code, seen.decode()


def _size(world: World, rid: str) -> int:
    row = world.storage.catalog.get(rid)
    assert row is not None
    return row.size


def test_export_shows_progress_on_a_terminal_only(
    world: World, calls: dict[str, str], tmp_path: Path
) -> None:
    size, rid = _size(world, calls["a1"]), calls["a1"]
    export = ["export", rid, "--purpose", "security", "--store", world.store.address, "--out"]
    code, shown = _callrec(world, "ad", [*export, str(tmp_path / "a.ogg")], tty=True)
    assert code == 0, shown
    total = size_text(size)
    assert f"export {rid}: {total} / {total}  100%" in shown
    assert (tmp_path / "a.ogg").stat().st_size == size
    code, stderr = _callrec(world, "ad", [*export, str(tmp_path / "b.ogg")], tty=False)
    assert (code, stderr) == (0, "")


def test_a_data_subject_package_shows_progress_on_a_terminal_only(
    world: World, calls: dict[str, str], tmp_path: Path
) -> None:
    total = size_text(_size(world, calls["a1"]) + _size(world, calls["a2"]))
    package = ["dsr", "export", calls["a1"], calls["a2"], "--reason", "case-5"]
    package += ["--store", world.store.address, "--out"]
    code, shown = _callrec(world, "po", [*package, str(tmp_path / "p.zip")], tty=True)
    assert code == 0, shown
    assert f"dsr export → {tmp_path / 'p.zip'}: {total} / {total}  100%" in shown
    code, stderr = _callrec(world, "po", [*package, str(tmp_path / "q.zip")], tty=False)
    assert (code, stderr) == (0, "")


def test_console_export_shows_progress_on_a_terminal_only(
    world: World, calls: dict[str, str], tmp_path: Path
) -> None:
    """The operator console on the store host (its Unix socket, no token)."""
    rid = calls["a2"]
    total = size_text(_size(world, rid))
    console = ["console-export", rid, "--store-dir", str(world.config.data_dir)]
    console += ["--reason", "INC-9", "--purpose", "security", "--out"]
    code, shown = _callrec(world, "ad", [*console, str(tmp_path / "c.ogg")], tty=True)
    assert code == 0, shown
    assert f"export {rid}: {total} / {total}  100%" in shown
    code, stderr = _callrec(world, "ad", [*console, str(tmp_path / "d.ogg")], tty=False)
    assert (code, stderr) == (0, "")
    assert (tmp_path / "d.ogg").read_bytes() == (tmp_path / "c.ogg").read_bytes()


# ---------------------------------------------------------------- choices


def test_a_flag_outside_its_choices_is_refused_with_the_list(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exited:
        cli.main(["search", "--flag", "silent", "--purpose", "legal"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --flag: invalid choice: 'silent' (choose from " in err
    assert all(f"'{name}'" in err for name in FLAG_NAMES)
    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    assert "silent_customer, silent_employee" in capsys.readouterr().out


def test_dsr_find_refuses_a_region_that_is_not_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dsr", "find", "--at", "2026-11-27T10:15", "--region", "XX"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("argument --region: 'XX': expected a region code such as FI or SE\n")
