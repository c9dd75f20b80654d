from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.directory import (
    Directory,
    DirectoryError,
    LiveDirectory,
    Role,
    aor_keys,
)
from agent.recorder.loops import FileWatcher
from tests.support.stack import DIRECTORY_TOML


def test_load_and_match(tmp_path: Path) -> None:
    path = tmp_path / "people.toml"
    path.write_text(DIRECTORY_TOML)
    directory = Directory.load(path)
    aino = directory.find_by_aor('"Aino" <sip:1001@PBX.example;transport=udp>')
    assert aino is not None and aino.name == "Aino Virtanen" and aino.role is Role.AGENT
    assert directory.find_by_aor("1001") == aino
    assert directory.find_by_aor("sip:1099@pbx.example") is None
    assert directory.people["s2001"].trained == dt.date(2026, 1, 15)


def test_aor_keys() -> None:
    assert aor_keys("sip:1001@pbx.example") == ("1001@pbx.example", "1001")
    assert aor_keys("1001") == ("1001",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[person]]\nid = "a"\nname = "A"\nrole = "boss"\n', "role = 'boss': expected one of"),
        ('[[person]]\nid = "a"\nrole = "agent"\n', "name = None: expected a non-empty string"),
        (
            '[[person]]\nid = "a"\nname = "A"\nrole = "agent"\nsupervisor = "zz"\n',
            "supervisor 'zz' is not",
        ),
        ('[[person]]\nid = "a"\nname = "A"\nrole = "agent"\ntrained = "yes"\n', "trained = 'yes'"),
        (
            '[[person]]\nid = "a"\nname = "A"\nrole = "agent"\naors = ["1001"]\n'
            '[[person]]\nid = "b"\nname = "B"\nrole = "agent"\naors = ["sip:1001@x"]\n',
            "belongs to both",
        ),
        ("[[person]\n", "not valid TOML"),
    ],
)
def test_bad_directory_is_refused_with_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "people.toml"
    path.write_text(text)
    with pytest.raises(DirectoryError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Directory.load(path)


def test_bad_reload_keeps_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "people.toml"
    path.write_text(DIRECTORY_TOML)
    live = LiveDirectory(path)
    path.write_text(DIRECTORY_TOML.replace("Aino Virtanen", "Aino Laine"))
    assert live.reload()
    assert live.current.people["e1001"].name == "Aino Laine"
    path.write_text("[[person]\n")
    assert not live.reload()
    assert live.current.people["e1001"].name == "Aino Laine"
    assert "event=directory_reload_failed" in caplog.text


def test_watcher_reloads_on_edit_and_keeps_old_on_broken_edit(tmp_path: Path) -> None:
    path = tmp_path / "people.toml"
    path.write_text(DIRECTORY_TOML)
    live = LiveDirectory(path)
    watcher = FileWatcher(path, live.reload, debounce_s=0.1)
    watcher.start()
    try:
        # An editor's save: write a new file and rename it over the old one.
        tmp = tmp_path / ".people.toml.swp"
        tmp.write_text(DIRECTORY_TOML.replace("Aino Virtanen", "Aino Laine"))
        tmp.replace(path)
        assert _eventually(lambda: live.current.people["e1001"].name == "Aino Laine")
        path.write_text("[[person]\n")  # broken in place
        time.sleep(1.0)
        assert live.current.people["e1001"].name == "Aino Laine"
        path.write_text(DIRECTORY_TOML)
        assert _eventually(lambda: live.current.people["e1001"].name == "Aino Virtanen")
    finally:
        watcher.stop()
        watcher.join(5)


class _CountingDirectory(LiveDirectory):
    loads = 0

    def reload(self) -> bool:
        self.loads += 1
        return super().reload()


def test_watchers_are_not_woken_by_reads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Several watchers of one file, each reload reading it: reads must not count as
    changes, or each reload wakes the others (it did: ~6 reloads/s in every worker)."""
    caplog.set_level("INFO", logger="agent.directory")
    path = tmp_path / "people.toml"
    path.write_text(DIRECTORY_TOML)
    lives = [_CountingDirectory(path) for _ in range(3)]
    watchers = [FileWatcher(path, live.reload, debounce_s=0.05) for live in lives]
    for watcher in watchers:
        watcher.start()
    try:
        for _ in range(5):
            Directory.load(path)  # someone reads it (a reload elsewhere, an operator)
        path.write_text(DIRECTORY_TOML.replace("Aino Virtanen", "Aino Laine"))
        assert _eventually(lambda: all(live.loads for live in lives))
        time.sleep(1.0)
        assert [live.loads for live in lives] == [1, 1, 1]
        path.write_text(path.read_text())  # saved again unchanged: read, not announced
        assert _eventually(lambda: all(live.loads == 2 for live in lives))
        assert caplog.text.count("event=directory_reloaded") == 3
    finally:
        for watcher in watchers:
            watcher.stop()
            watcher.join(5)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
