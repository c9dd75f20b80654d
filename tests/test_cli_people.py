"""The CLI as people use it (issue 16): times in the person's local time zone with the
zone named (the operator's `console-list` too), naive times typed mean local time, and
`callrec play` refuses to pour audio into a terminal. `callrec` runs as its own process
against the real store."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.cli import localtime
from agent.cli.main import format_recordings
from agent.manifest import timestamp
from agent.pb.callrec.v1 import recordings_pb2 as pb
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


def test_console_list_shows_local_time_with_the_zone_and_its_json_stays_utc(
    world: World,
) -> None:
    rid = world.seed(AINO, STARTED_MS)  # 09:15:30-09:16:00 UTC
    argv = ["console-list", "--store-dir", str(world.config.data_dir), "--limit", "1000"]
    shown = _run(argv, "Europe/Helsinki", capture_output=True)
    assert shown.returncode == 0, shown.stderr
    line = next(ln for ln in shown.stdout.decode().splitlines() if ln.startswith(rid))
    assert "  2026-07-01 12:15:30 +03:00 EEST → 12:16:00    30.0s  inbound " in line
    listed = _run([*argv, "--json"], "Europe/Helsinki", capture_output=True)
    row = next(r for r in json.loads(listed.stdout) if r["recording_id"] == rid)
    assert (row["started_at"], row["ended_at"]) == (
        "2026-07-01T09:15:30.000+00:00", "2026-07-01T09:16:00.000+00:00"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("start", "shown"),
    [
        # Past local midnight: the end's date is shown.
        (
            "2026-07-01T20:59:50",
            "2026-07-01 23:59:50 +03:00 EEST → 2026-07-02 00:00:20 +03:00 EEST",
        ),
        # Over the autumn clock change (04:00 EEST becomes 03:00 EET): its offset is.
        ("2026-10-25T00:59:50", "2026-10-25 03:59:50 +03:00 EEST → 2026-10-25 03:00:20 +02:00 EET"),
    ],
)
def test_console_list_names_the_end_in_full_when_its_day_or_offset_differs(
    start: str, shown: str
) -> None:
    began = dt.datetime.fromisoformat(start).replace(tzinfo=dt.UTC)
    manifest = pb.Manifest(
        recording_id="0" * 32, started_at=timestamp(began),
        ended_at=timestamp(began + dt.timedelta(seconds=30)),
    )  # fmt: skip
    info = pb.RecordingInfo(manifest=manifest, duration_ms=30_000)
    [line] = format_recordings([info], ZoneInfo("Europe/Helsinki"))
    assert line.startswith(f"{'0' * 32}  {shown}  ")


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
