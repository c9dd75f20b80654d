"""Master keys in a PKCS#11 token (issue 18), against a real token: SoftHSM2 from
Debian (`.ci/setup` installs it), one token per test in ``tmp_path``. The key is made
in the token, never extractable; the running store wraps and unwraps each recording's
data key there; rotation, rewrap and retirement work through `callrec keys`; a store
on another token refuses a catalog whose keys it does not hold."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkcs11
import pytest
import sqlalchemy as sa
from pkcs11 import Attribute

from agent.cli.main import main
from agent.config import StoreConfig, store_config_from_dict
from agent.privacy import KeyFileError
from agent.store.archive.vault import Storage, open_storage
from agent.store.catalog import master_keys
from agent.store.keys.pkcs11 import Pkcs11KeyWrapper
from tests.support.services import write_store_toml
from tests.support.stack import InProcessStore
from tests.test_key_custody import _manifest, _upload

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "4711-callrec"


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SoftHSM2's config for this session (read when the library initialises)."""
    assert MODULE.exists(), "SoftHSM2 is missing: run .ci/setup (apt package softhsm2)"
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return root


def new_token(softhsm: Path, label: str) -> None:
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label,
         "--so-pin", "so-" + PIN, "--pin", PIN],
        check=True, capture_output=True,
    )  # fmt: skip
    pkcs11.lib(str(MODULE)).reinitialize()  # see the new token's slot


def token_store(root: Path, label: str, catalog: str | None = None) -> dict[str, Any]:
    pin = root / "keys" / "hsm.pin"
    pin.parent.mkdir(exist_ok=True, mode=0o700)
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)
    store: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "data_dir": str(root / "data"),
        "tls": {"insecure": True},
        "keys": {"wrapper": "pkcs11", "pkcs11_module": str(MODULE),
                 "pkcs11_token_label": label, "pkcs11_pin_file": str(pin)},
    }  # fmt: skip
    if catalog:
        store["catalog"] = catalog
    return store


def config_of(root: Path, store: dict[str, Any]) -> StoreConfig:
    return store_config_from_dict({"store": store}, root)


@pytest.fixture
def token(softhsm: Path) -> str:
    label = "t" + secrets.token_hex(6)
    new_token(softhsm, label)
    return label


@pytest.fixture
def storage(tmp_path: Path, token: str) -> Iterator[Storage]:
    opened = open_storage(config_of(tmp_path, token_store(tmp_path, token)))
    yield opened
    opened.catalog.close()


def test_the_running_store_keeps_its_master_key_in_the_token(tmp_path: Path, token: str) -> None:
    cfg = config_of(tmp_path, token_store(tmp_path, token))
    with InProcessStore(cfg) as store:
        manifest = _manifest(secrets.token_hex(16), 1_790_000_000_000, "c2VhbGVk")
        _upload(store.address, manifest)  # the running store wrapped its data key
        storage = open_storage(cfg)
        wrapper = storage.vault.wrapper
        assert isinstance(wrapper, Pkcs11KeyWrapper) and wrapper.source == "pkcs11"
        key = wrapper.key(wrapper.current_key_id)
        assert key[Attribute.EXTRACTABLE] is False and key[Attribute.SENSITIVE] is True
        with pytest.raises(pkcs11.exceptions.PKCS11Error):
            key[Attribute.VALUE]  # the token refuses to give the key out
        row = storage.catalog.get(manifest.recording_id)
        assert row is not None
        audio = b"".join(storage.vault.read(row.recording_id, row.blob_key))
        assert hashlib.sha256(audio).hexdigest() == manifest.sha256
        with storage.catalog.engine.connect() as conn:
            registered = conn.execute(sa.select(master_keys.c.key_id, master_keys.c.source)).all()
        storage.catalog.close()
    assert registered == [(wrapper.current_key_id, "pkcs11")]
    assert not [p for p in tmp_path.rglob("*.key")], "no key file on the store host"


def test_keys_commands_rotate_rewrap_retire_in_the_token(
    tmp_path: Path, token: str, storage: Storage, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = []
    for _ in range(3):
        rid, data = secrets.token_hex(16), os.urandom(2000)
        source = tmp_path / f"{rid}.src"
        source.write_bytes(data)
        stored.append((rid, storage.vault.store(rid, source, tmp_path), data))
    old = storage.vault.wrapper.current_key_id
    config = str(write_store_toml(tmp_path / "store.toml", token_store(tmp_path, token)))

    assert main(["keys", "master", "rotate", "--config", config]) == 0
    new = capsys.readouterr().out.split()[1]
    assert new != old
    assert main(["keys", "master", "retire", old, "--config", config]) == 2
    assert "still wraps 3 data keys" in capsys.readouterr().err
    assert main(["keys", "master", "rewrap", "--config", config]) == 0
    assert capsys.readouterr().out == f"re-wrapped 3 data keys under {new}\n"
    assert main(["keys", "master", "retire", old, "--config", config]) == 0
    capsys.readouterr()

    reopened = open_storage(config_of(tmp_path, token_store(tmp_path, token)))
    assert reopened.vault.wrapper.key_ids() == {new}, "the old key is gone from the token"
    for rid, blob, data in stored:
        assert b"".join(reopened.vault.read(rid, blob)) == data
    reopened.catalog.close()


def test_a_store_on_another_token_refuses_the_catalog(
    tmp_path: Path, softhsm: Path, token: str, storage: Storage
) -> None:
    other = "o" + secrets.token_hex(6)
    new_token(softhsm, other)
    shared = storage.catalog.url
    elsewhere = tmp_path / "replica-b"
    elsewhere.mkdir()
    with pytest.raises(KeyFileError, match="holds no callrec master key, but the catalog knows"):
        open_storage(config_of(elsewhere, token_store(elsewhere, other, shared)))


def test_a_wrong_pin_is_a_clear_error(tmp_path: Path, token: str) -> None:
    store = token_store(tmp_path, token)
    Path(store["keys"]["pkcs11_pin_file"]).write_text("0000\n")
    with pytest.raises(KeyFileError, match="cannot log in"):
        open_storage(config_of(tmp_path, store))
