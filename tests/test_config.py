"""A bad config fails at start with the key's name and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.main import main
from agent.config import ConfigError, load_agent_config, load_store_config, parse_duration
from tests.support.stack import DIRECTORY_TOML, Keys, agent_config, write_toml


def test_agent_config_round_trip(tmp_path: Path, keys: Keys) -> None:
    cfg, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    loaded = load_agent_config(write_toml(tmp_path / "agent.toml", doc))
    assert loaded == cfg
    assert loaded.sip.rtp_timeout_s == 10.0
    assert loaded.audio.format == "opus"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("sip", "port", 70000, "[sip] port = 70000: expected an integer from 1 to 65535"),
        ("sip", "rtp_timeout", "soon", '[sip] rtp_timeout = "soon": expected a duration'),
        ("audio", "format", "mp3", '[audio] format = "mp3": expected one of opus, flac, wav'),
        (
            "sip",
            "worker_start",
            "spawn",
            '[sip] worker_start = "spawn": expected one of fork, exec',
        ),
        ("sip", "frame_ms", 30, "[sip] frame_ms = 30: expected 20, 40 or 60"),
        ("sip", "frame_ms", 80, "[sip] frame_ms = 80: expected an integer from 20 to 60"),
        ("audio", "workers", -1, "[audio] workers = -1: expected an integer from 0 to 64"),
        ("agent", "site", "Helsinki 1", '[agent] site = "Helsinki 1": expected lower-case'),
        ("sip", "colour", "blue", "[sip] colour: unknown key"),
        (
            "uplink",
            "chunk_bytes",
            1024,
            "[uplink] chunk_bytes = 1024: expected an integer from 65536",
        ),
        ("uplink", "live", "yes", '[uplink] live = "yes": expected'),
        ("uplink", "live_flush", "5s", '[uplink] live_flush = "5s": expected from "100ms" to "2s"'),
        (
            "uplink",
            "live_encoding",
            "ulaw",
            '[uplink] live_encoding = "ulaw": expected one of alaw, pcm',
        ),
        # TLS files: all three or none, in [uplink] and [control] alike.
        ("uplink", "ca_file", "ca.pem", "[uplink] cert_file: missing; ca_file, cert_file and"),
        ("control", "key_file", "a.key", "[control] ca_file: missing; ca_file, cert_file and"),
    ],
)
def test_agent_config_errors_name_the_key(
    tmp_path: Path, keys: Keys, section: str, key: str, value: object, message: str
) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    doc.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as err:
        load_agent_config(write_toml(tmp_path / "agent.toml", doc))
    assert str(err.value).startswith(message)


def test_missing_required_key(tmp_path: Path, keys: Keys) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    del doc["calls"]["service_numbers"]
    with pytest.raises(ConfigError, match=r"\[calls\] service_numbers: missing"):
        load_agent_config(write_toml(tmp_path / "agent.toml", doc))


def test_store_retention_error_is_readable(tmp_path: Path) -> None:
    path = tmp_path / "store.toml"
    path.write_text('[store]\ndata_dir = "d"\nretention = "6 monts"\n')
    with pytest.raises(ConfigError) as err:
        load_store_config(path)
    assert str(err.value) == '[store] retention = "6 monts": expected e.g. "6 months"'


def test_store_data_dir_too_deep_for_its_sockets_is_named(tmp_path: Path) -> None:
    deep = "/srv/" + "d" * 90
    path = tmp_path / "store.toml"
    path.write_text(f'[store]\ndata_dir = "{deep}"\n')
    with pytest.raises(ConfigError) as err:
        load_store_config(path)
    assert str(err.value).startswith(f'[store] data_dir = "{deep}": expected a shorter path')
    assert "console.inner.sock" in str(err.value) and "107 bytes" in str(err.value)


def test_store_defaults(tmp_path: Path) -> None:
    path = tmp_path / "store.toml"
    path.write_text('[store]\ndata_dir = "d"\n')
    cfg = load_store_config(path)
    assert cfg.retention_months == 6
    assert cfg.catalog_url == f"sqlite:///{tmp_path / 'd' / 'catalog.sqlite3'}"


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[agent\nsite=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(path)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("2h", 7200), ("250ms", 0.25), (12, 12)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_cli_reports_config_error_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store.toml"
    path.write_text('[store]\ndata_dir = "d"\nlisten = "nowhere"\n')
    assert main(["check", "--store", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert '[store] listen = "nowhere"' in err


def test_check_store_refuses_world_readable_seal_key_and_missing_directory(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "store.toml"
    path.write_text(
        '[store]\ndata_dir = "d"\nseal_key_file = "keys/seal.pem"\n'
        'directory_file = "people.toml"\n\n[store.tls]\ninsecure = true\n'
    )
    (tmp_path / "people.toml").write_text(DIRECTORY_TOML)
    assert main(["check", "--store", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == "ok\n"
    keys.seal_private.chmod(0o644)
    (tmp_path / "people.toml").unlink()
    assert main(["check", "--store", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert "seal.pem: key file is readable by group or others" in lines[0]
    assert "people.toml: directory file not found" in lines[1]


def test_check_agent_refuses_a_lookup_key(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent host that still names its old lookup.key is told to delete it."""
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    config = write_toml(tmp_path / "agent.toml", doc)
    assert main(["check", "--agent", str(config)]) == 0, capsys.readouterr().err
    doc["privacy"]["lookup_key_file"] = str(keys.directory / "lookup.key")
    config = write_toml(tmp_path / "agent.toml", doc)
    assert main(["check", "--agent", str(config)]) == 1
    err = capsys.readouterr().err
    assert "[privacy] lookup_key_file" in err and "delete the file" in err


def test_check_names_each_bad_tls_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    (tls / "ca.pem").write_text("not a certificate")
    (tls / "store.key").write_text("key")
    (tls / "store.key").chmod(0o644)
    path = tmp_path / "store.toml"
    path.write_text(
        '[store]\ndata_dir = "d"\n\n[store.tls]\nca_file = "tls/ca.pem"\n'
        'cert_file = "tls/store.pem"\nkey_file = "tls/store.key"\n'
    )
    assert main(["check", "--store", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert "ca.pem: not a PEM certificate" in lines[0]
    assert "store.pem: certificate not found" in lines[1]
    assert "store.key: key file is readable by group or others" in lines[2]


def test_every_wrong_key_is_named_at_once(tmp_path: Path, keys: Keys) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    doc["sip"]["port"] = 70000
    doc["audio"] = {"format": "mp3"}
    doc["uplink"]["insecure"] = "yes"
    with pytest.raises(ConfigError) as err:
        load_agent_config(write_toml(tmp_path / "agent.toml", doc))
    lines = str(err.value).splitlines()
    assert lines[0] == "3 config errors:"
    assert sorted(lines[1:]) == [
        '[audio] format = "mp3": expected one of opus, flac, wav',
        "[sip] port = 70000: expected an integer from 1 to 65535",
        '[uplink] insecure = "yes": expected true or false',
    ]


def test_values_are_shown_as_toml(tmp_path: Path, keys: Keys) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    path = write_toml(tmp_path / "agent.toml", doc)
    path.write_text(path.read_text() + "[audio]\nformat = true\nworkers = [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert "[audio] format = true: expected a non-empty string" in str(err.value)
    assert "[audio] workers = [1, 2]: expected an integer" in str(err.value)


def test_the_cli_lists_every_error(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    doc["sip"]["colour"] = "blue"
    doc["sip"]["flavour"] = "mint"
    assert main(["check", "--agent", str(write_toml(tmp_path / "agent.toml", doc))]) == 2
    err = capsys.readouterr().err
    assert "[sip] colour: unknown key" in err and "[sip] flavour: unknown key" in err
