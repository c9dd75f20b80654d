"""Master keys (issues 14 and 18): outside data_dir, one key set for every store of a
catalog (SQLite and PostgreSQL), unique key ids, and the operator's `callrec keys`
commands: init, rotate, rewrap, retire, list; seal-key rotation."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.cli.main import main
from agent.config import ConfigError, StoreConfig, store_config_from_dict
from agent.privacy import KeyFileError, read_key_file
from agent.store.archive.vault import Storage, open_storage
from agent.store.keys.master import (
    FileKeyWrapper,
    KeySetMismatch,
    create_master_key_file,
    new_key_id,
)
from agent.store.keys.numbers import SealKeyring
from tests.support.services import Postgres, postgres, write_store_toml  # noqa: F401 (fixture)
from tests.support.stack import Keys


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'catalog.sqlite3'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return pg.new_database()


def replica(tmp_path: Path, name: str, catalog_url: str) -> StoreConfig:
    """A store with its own data_dir and key file path, on the shared catalog."""
    store = {
        "listen": "127.0.0.1:0",
        "data_dir": str(tmp_path / name / "data"),
        "catalog": catalog_url,
        "tls": {"insecure": True},
        "keys": {"master_key_file": str(tmp_path / name / "keys" / "master.key")},
    }
    if catalog_url.startswith("postgresql"):
        store["shared_blobs_dir"] = str(tmp_path / "blobs")  # what every replica mounts
    return store_config_from_dict({"store": store}, tmp_path)


def store_one(storage: Storage, tmp_path: Path) -> tuple[str, str, bytes]:
    rid, data = secrets.token_hex(16), os.urandom(3000)
    source = tmp_path / f"{rid}.src"
    source.write_bytes(data)
    blob = storage.vault.store(rid, source, tmp_path, hashlib.sha256(data).hexdigest())
    return rid, blob, data


def test_a_shared_catalog_has_one_key_set(tmp_path: Path, catalog_url: str) -> None:
    a = open_storage(replica(tmp_path, "a", catalog_url))
    rid, blob, data = store_one(a, tmp_path)
    b_cfg = replica(tmp_path, "b", catalog_url)
    b_key = b_cfg.master_key_file

    with pytest.raises(KeyFileError, match="master key file missing, but the catalog knows"):
        open_storage(b_cfg)
    assert not b_key.exists(), "a store never makes a key when the catalog knows keys"

    create_master_key_file(b_key)  # B's own key, as each replica used to make
    with pytest.raises(KeySetMismatch, match="not in file"):
        open_storage(b_cfg)

    a_id = a.vault.wrapper.current_key_id
    b_key.write_text(f"{a_id} {'Q' * 43}=\n")  # A's id, another secret
    with pytest.raises(KeySetMismatch, match="not the key this catalog knows"):
        open_storage(b_cfg)

    b_key.write_bytes((tmp_path / "a" / "keys" / "master.key").read_bytes())  # the shared file
    b = open_storage(b_cfg)
    # B opens A's data keys (the blobs here are each replica's own files).
    assert b.vault.data_key(rid, blob) == a.vault.data_key(rid, blob)
    assert b"".join(a.vault.read(rid, blob)) == data
    a.catalog.close()
    b.catalog.close()


def test_replicas_starting_together_on_a_new_catalog_make_one_key(
    tmp_path: Path, catalog_url: str
) -> None:
    configs = [replica(tmp_path, f"r{i}", catalog_url) for i in range(3)]
    barrier = threading.Barrier(len(configs))
    outcomes: list[object] = []

    def start(cfg: StoreConfig) -> None:
        barrier.wait()
        try:
            storage = open_storage(cfg)
            outcomes.append(storage.vault.wrapper.current_key_id)
            storage.catalog.close()
        except KeyFileError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    started = [o for o in outcomes if isinstance(o, str)]
    assert len(started) == 1, outcomes
    assert sum(c.master_key_file.exists() for c in configs) == 1
    assert all("catalog knows master keys" in str(o) for o in outcomes if o not in started)


def test_key_ids_are_unique_within_a_second() -> None:
    ids = {new_key_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) <= 32 for i in ids)


def test_master_key_lives_outside_data_dir(tmp_path: Path) -> None:
    default = store_config_from_dict({"store": {"data_dir": "data"}}, tmp_path)
    assert default.master_key_file == tmp_path / "keys" / "master.key"
    for key in ("data/keys/master.key", "data/master.key"):
        doc = {"store": {"data_dir": "data", "keys": {"master_key_file": key}}}
        with pytest.raises(ConfigError, match=r"\[store.keys\] master_key_file .*outside data_dir"):
            store_config_from_dict(doc, tmp_path)
    doc = {"store": {"data_dir": "data", "seal_key_file": "data/seal.pem"}}
    with pytest.raises(ConfigError, match=r"\[store\] seal_key_file .*outside data_dir"):
        store_config_from_dict(doc, tmp_path)


def test_a_master_key_left_in_data_dir_stops_the_store_with_what_to_do(tmp_path: Path) -> None:
    cfg = replica(tmp_path, "old", f"sqlite:///{tmp_path / 'old' / 'data' / 'catalog.sqlite3'}")
    old = cfg.data_dir / "keys" / "master.key"
    create_master_key_file(old)
    with pytest.raises(KeyFileError, match=f"inside data_dir.*move it to {cfg.master_key_file}"):
        open_storage(cfg)


# ---------------------------------------------------------------- callrec keys


def _cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


def test_keys_master_init_rotate_rewrap_retire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "tls": {"insecure": True}}
    config = str(write_store_toml(tmp_path / "store.toml", store))
    cli = _cli(capsys)
    assert cli("keys", "master", "init", "--config", config)[0] == 0
    key_file = tmp_path / "keys" / "master.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    [(old_id, _)] = read_key_file(key_file)
    assert cli("keys", "master", "init", "--config", config)[0] == 2, "never twice"

    cfg = store_config_from_dict({"store": store}, tmp_path)
    storage = open_storage(cfg)
    stored = [store_one(storage, tmp_path) for _ in range(3)]
    storage.catalog.close()

    code, out = cli("keys", "master", "rotate", "--config", config)
    assert code == 0 and "rewrap" in out, out
    new_id = read_key_file(key_file)[0][0]
    assert new_id != old_id
    code, out = cli("keys", "master", "retire", old_id, "--config", config)
    assert code == 2 and "still wraps 3 data keys" in out
    code, out = cli("keys", "master", "list", "--config", config)
    assert f"{new_id}  active   current   data_keys=0" in out, out
    assert f"{old_id}  active   held      data_keys=3" in out, out
    code, out = cli("keys", "master", "list", "--config", config, "--json")
    assert json.loads(out) == [
        {"key_id": old_id, "state": "active", "here": "held", "data_keys": 3},
        {"key_id": new_id, "state": "active", "here": "current", "data_keys": 0},
    ]
    assert cli("keys", "master", "rewrap", "--config", config) == (
        0,
        f"re-wrapped 3 data keys under {new_id}\n",
    )
    assert cli("keys", "master", "retire", old_id, "--config", config)[0] == 0
    assert [k for k, _ in read_key_file(key_file)] == [new_id]
    code, out = cli("keys", "master", "list", "--config", config)
    assert f"{old_id}  retired  not held  data_keys=0" in out, out

    reopened = open_storage(cfg)  # the retired key is no longer required
    for rid, blob, data in stored:
        assert b"".join(reopened.vault.read(rid, blob)) == data
    assert FileKeyWrapper.load(key_file).key_ids() == {new_id}
    reopened.catalog.close()


def test_keys_seal_rotate_keeps_older_seals_openable(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.privacy import Sealer

    store = {"data_dir": "data", "seal_key_file": str(keys.seal_private)}
    config = str(write_store_toml(tmp_path / "store.toml", store))
    old_seal = Sealer.load(keys.seal_public).seal("567")
    cli = _cli(capsys)
    public = tmp_path / "seal-2.pub.pem"
    code, out = cli("keys", "seal", "rotate", "--config", config, "--public-out", str(public))
    assert code == 0 and str(public) in out, out
    keyring = SealKeyring.load(keys.seal_private)
    assert len(keyring.keys) == 2 and keyring.public_pem() == public.read_bytes()
    assert keyring.open(old_seal) == "567"
    assert keyring.open(Sealer.load(public).seal("042")) == "042"
    assert keys.seal_private.stat().st_mode & 0o777 == 0o600


UNITS = Path(__file__).resolve().parent.parent / "systemd"


@pytest.mark.parametrize("unit", ["callrec-store.service", "callrec-agent.service"])
def test_unit_comments_give_key_modes_the_daemons_accept(unit: str, tmp_path: Path) -> None:
    """Each comment line that names a key and a mode: a file with that mode passes the
    daemons' own check (they refuse any group or other bit)."""
    from agent.privacy import check_private_file

    said = [
        (line, int(mode, 8))
        for line in (UNITS / unit).read_text().splitlines()
        if line.startswith("#") and "key" in line
        for mode in re.findall(r"\b0[0-7]{3}\b", line)
    ]
    assert said, "the unit says which mode its keys need"
    for line, mode in said:
        path = tmp_path / "key"
        path.write_text("k")
        path.chmod(mode)
        try:
            check_private_file(path)
        except KeyFileError as exc:
            raise AssertionError(f"{unit}: {line!r}: {exc}") from None
        path.unlink()
