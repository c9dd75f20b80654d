"""The CLI as people use it (issue 16): times in the person's local time zone with the
zone named, naive times typed mean local time, and `callrec play` refuses to pour
audio into a terminal. `callrec` runs as its own process against the real store."""

from __future__ import annotations

import datetime as dt
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import localtime
from tests.support.access_world import World, opus_audio, running_world
from tests.support.stack import make_keys

CALLREC = str(Path(sys.executable).parent / "callrec")
AINO: list[tuple[str, str, str | None]] = [("a1", "Aino Agent", "parcels")]
# 2026-07-01 09:15:30 UTC is 12:15:30 in Helsinki (summer, +03:00).
STARTED_MS = int(dt.datetime(2026, 7, 1, 9, 15, 30, tzinfo=dt.UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cli-people")
    yield from running_world(root, make_keys(root / "keys"))


def _client(world: World, tmp_path: Path, person: str) -> list[str]:
    token = tmp_path / f"{person}.token"
    token.write_text(world.tokens[person] + "\n")
    return ["--store", world.store.address, "--token-file", str(token)]


def _run(argv: list[str], tz: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TZ": tz}
    return subprocess.run([CALLREC, *argv], env=env, timeout=60, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_search_shows_and_reads_local_time_with_the_zone_named(
    world: World, tmp_path: Path
) -> None:
    rid = world.seed(AINO, STARTED_MS)
    client = _client(world, tmp_path, "a1")
    base = ["search", "--purpose", "verification", *client]
    # Typed without an offset: Helsinki's local time, so 12:15 (local) is after the start
    # and 12:16 is not; read as UTC both would be hours later.
    shown = _run([*base, "--since", "2026-07-01T12:15", "--until", "2026-07-01T12:16"],
                 "Europe/Helsinki", capture_output=True)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    line = next(ln for ln in shown.stdout.decode().splitlines() if ln.startswith(rid))
    assert "2026-07-01 12:15:30 +03:00 EEST" in line
    later = _run([*base, "--since", "2026-07-01T12:16"], "Europe/Helsinki", capture_output=True)
    assert rid not in later.stdout.decode()
    # Another person's zone: the same instant in theirs.
    ny = _run([*base, "--since", "2026-07-01T05:15", "--until", "2026-07-01T05:16"],
              "America/New_York", capture_output=True)  # fmt: skip
    assert "2026-07-01 05:15:30 -04:00 EDT" in ny.stdout.decode()
    # An explicit offset wins over the zone.
    utc = _run([*base, "--since", "2026-07-01T09:15:00+00:00", "--until", "2026-07-01T09:16Z"],
               "Europe/Helsinki", capture_output=True)  # fmt: skip
    assert rid in utc.stdout.decode()


def test_local_time_in_winter_and_a_bad_time_is_a_usage_error(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moment = dt.datetime(2026, 1, 15, 8, 0, tzinfo=dt.UTC)
    monkeypatch.setenv("TZ", "Europe/Helsinki")
    assert localtime.show(moment) == "2026-01-15 10:00:00 +02:00 EET"
    assert localtime.parse("2026-01-15T10:00") == moment
    # No usable TZ: the zone /etc/localtime links to, by its IANA name.
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Europe/Helsinki")
    monkeypatch.setattr(localtime, "LOCALTIME", link)
    monkeypatch.setenv("TZ", "Nowhere/Atlantis")
    assert localtime.zone_name(localtime.local_zone()) == "Europe/Helsinki"
    client = _client(world, tmp_path, "a1")
    bad = _run(["search", "--purpose", "verification", "--since", "15.1.2026", *client],
               "Europe/Helsinki", capture_output=True)  # fmt: skip
    assert bad.returncode == 2
    assert "expected an ISO time such as 2026-03-02T14:30" in bad.stderr.decode()


def test_play_refuses_a_terminal_and_writes_to_a_pipe(world: World, tmp_path: Path) -> None:
    rid = world.seed(AINO, STARTED_MS)
    argv = ["play", rid, "--purpose", "verification", *_client(world, tmp_path, "a1")]
    seq = world.head_seq()
    leader, follower = pty.openpty()
    try:
        done = _run(argv, "UTC", stdout=follower, stderr=subprocess.PIPE)
    finally:
        os.close(follower)
    try:
        os.set_blocking(leader, False)
        try:
            on_terminal = os.read(leader, 65536)
        except (BlockingIOError, OSError):
            on_terminal = b""
    finally:
        os.close(leader)
    assert done.returncode == 2
    error = done.stderr.decode().strip()
    assert len(error.splitlines()) == 1 and "terminal" in error
    assert "--out FILE" in error and "web player" in error
    assert on_terminal == b"", "no audio bytes on the terminal"
    assert world.events_after(seq) == [], "nothing asked of the store"
    # To a pipe (a player reading stdin) the audio flows, and the play is audited.
    piped = _run(argv, "UTC", capture_output=True)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == opus_audio()
    assert [e["action"] for e in world.events_after(seq)] == ["play"]
    # --out FILE writes the file even from a terminal.
    out = tmp_path / "call.ogg"
    assert _run([*argv, "--out", str(out)], "UTC", capture_output=True).returncode == 0
    assert out.read_bytes() == opus_audio()
