"""The agent's quarantine: listed, retried and purged with the real ``callrec quarantine``
command, and expired by the agent within the retention (real files in tmp_path)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import logs
from agent.capture import quarantine
from agent.config import ConfigError, load_agent_config
from agent.recorder import daemon as daemon_module
from agent.recorder.daemon import AgentDaemon
from agent.recorder.quarantine import expire
from agent.recorder.spool.index import SpoolIndex
from tests.support.stack import Keys, agent_config, write_toml

CALLREC = str(Path(sys.executable).parent / "callrec")
DAY = 86400.0


def _callrec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CALLREC, "quarantine", *args], check=False, capture_output=True, text=True, timeout=60
    )


def _aged(entry: Path, days: float) -> Path:
    then = time.time() - days * DAY
    os.utime(entry.with_name(entry.name + ".reason"), (then, then))
    return entry


def _capture(root: Path, qdir: Path, rid: str, days: float) -> Path:
    capture = root / "work" / rid
    capture.mkdir(parents=True)
    (capture / "capture.json").write_text("{}")
    (capture / "leg-a.wav").write_bytes(b"\0" * 1000)
    return _aged(quarantine(capture, qdir, "finalize failed: ValueError('bad leg')"), days)


def _outbox(root: Path, qdir: Path, rid: str, days: float) -> Path:
    entry = root / "work" / rid
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    (entry / "audio.opus").write_bytes(b"\0" * 500)
    return _aged(quarantine(entry, qdir, "store refused upload: INVALID_ARGUMENT: x"), days)


@pytest.fixture
def config(tmp_path: Path, keys: Keys) -> Path:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    return write_toml(tmp_path / "agent.toml", doc)


def test_list_shows_id_stage_age_size_reason(tmp_path: Path, config: Path) -> None:
    qdir = load_agent_config(config).quarantine_dir
    _capture(tmp_path, qdir, "a" * 32, days=3)
    _outbox(tmp_path, qdir, "b" * 32, days=1)
    done = _callrec("list", "--config", str(config))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["a" * 32, "capture", "3d", "1002", "B"]
    assert lines[0].endswith("finalize failed: ValueError('bad leg')")
    assert lines[1].split()[:5] == ["b" * 32, "outbox", "1d", "502", "B"]


def test_retry_puts_entries_back(tmp_path: Path, config: Path) -> None:
    cfg = load_agent_config(config)
    _capture(tmp_path, cfg.quarantine_dir, "a" * 32, days=1)
    _outbox(tmp_path, cfg.quarantine_dir, "b" * 32, days=1)
    spool_entry = cfg.quarantine_dir / "spool-20261101T000000-abc123"
    spool_entry.mkdir()
    spool_entry.with_name(spool_entry.name + ".reason").write_text("reason: no sidecar\n")
    index = SpoolIndex(cfg.data_dir / "spool-index.sqlite3", lambda name: name)
    index.mark([("call-1.wav", 1, 10)], spool_entry.name)
    index.close()

    done = _callrec("retry", "a" * 32, "b" * 32, spool_entry.name, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (cfg.captures_dir / "ready" / ("a" * 32) / "leg-a.wav").exists()
    assert (cfg.outbox_dir / ("b" * 32) / "audio.opus").exists()
    assert "moved to" in done.stdout and "1 spool file(s) will be looked at again" in done.stdout
    index = SpoolIndex(cfg.data_dir / "spool-index.sqlite3", lambda name: name)
    assert not index.is_handled(("call-1.wav", 1, 10))
    index.close()
    assert sorted(p.name for p in cfg.quarantine_dir.iterdir()) == [
        spool_entry.name,
        spool_entry.name + ".reason",
    ]


def test_retry_of_an_unknown_entry_is_one_line(config: Path) -> None:
    done = _callrec("retry", "nope", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "callrec quarantine: nope: no such entry (see `callrec quarantine list`)"
    ]


def test_purge_by_age_asks_for_yes(tmp_path: Path, config: Path) -> None:
    qdir = load_agent_config(config).quarantine_dir
    old = _capture(tmp_path, qdir, "a" * 32, days=50)
    young = _outbox(tmp_path, qdir, "b" * 32, days=2)
    done = _callrec("purge", "--older-than", "40d", "--config", str(config))
    assert done.returncode == 0 and "add --yes" in done.stdout
    assert old.exists()
    done = _callrec("purge", "--older-than", "40d", "--yes", "--config", str(config))
    assert done.stdout.splitlines() == [f"deleted {'a' * 32} (capture)"]
    assert not old.exists() and not (qdir / f"{old.name}.reason").exists()
    assert young.exists()
    done = _callrec("purge", "b" * 32, "--yes", "--config", str(config))
    assert not young.exists() and list(qdir.iterdir()) == []


def test_the_agent_expires_old_entries_with_a_log_line(tmp_path: Path, config: Path) -> None:
    qdir = load_agent_config(config).quarantine_dir
    old = _capture(tmp_path, qdir, "a" * 32, days=31)
    young = _outbox(tmp_path, qdir, "b" * 32, days=29)
    out = io.StringIO()
    logs.configure("info", out)
    assert expire(qdir, load_agent_config(config).quarantine_max_age_s) == 1
    assert not old.exists() and young.exists()
    lines = [line for line in out.getvalue().splitlines() if "quarantine_expired" in line]
    assert len(lines) == 1 and f"entry={'a' * 32} " in lines[0] and "age_days=31" in lines[0]


def test_quarantine_max_age_stays_within_the_retention(tmp_path: Path, keys: Keys) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    assert load_agent_config(write_toml(tmp_path / "a.toml", doc)).quarantine_max_age_s == 30 * DAY
    doc["agent"]["quarantine_max_age"] = "7d"
    assert load_agent_config(write_toml(tmp_path / "a.toml", doc)).quarantine_max_age_s == 7 * DAY
    doc["agent"]["quarantine_max_age"] = "200d"
    with pytest.raises(ConfigError, match=r'quarantine_max_age = "200d": expected from "1h"'):
        load_agent_config(write_toml(tmp_path / "a.toml", doc))


class _Loop(AgentDaemon):
    """The agent's main loop's quarantine expiry alone (no workers, no store)."""

    def __init__(self, config: Path) -> None:
        self.config = load_agent_config(config)
        self._quarantine_checked = float("-inf")


def test_the_agent_loop_expires_hourly(
    tmp_path: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _Loop(config)
    qdir = loop.config.quarantine_dir
    first = _capture(tmp_path, qdir, "a" * 32, days=40)
    loop._expire_quarantine()
    assert not first.exists()
    second = _outbox(tmp_path, qdir, "b" * 32, days=40)
    loop._expire_quarantine()  # within the hour: not looked at again yet
    assert second.exists()
    monkeypatch.setattr(daemon_module, "QUARANTINE_CHECK_S", 0.0)
    loop._expire_quarantine()
    assert not second.exists()
