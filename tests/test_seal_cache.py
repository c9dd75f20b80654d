"""The store's seal.pem, read once and again only when the file changes: a rotation is
seen by the next upload, a loosened mode or a missing file still refuses (the ingest
check of each sealed tail runs on every upload; loading the keys costs ~140 ms)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.privacy import KeyFileError, Protector
from agent.store.keys.numbers import SealCache, SealError, rotate_seal_key
from tests.support.stack import make_keys

NUMBER = "+358 40 123 4567"


def test_the_keyring_is_reused_until_the_file_changes(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    cache = SealCache(keys.seal_private)
    first = cache.keyring()
    assert cache.keyring() is first, "an unchanged file is not read again"
    assert first.open(keys.protector().protect(NUMBER).tail_sealed or "") == "567"

    public = rotate_seal_key(keys.seal_private)  # `callrec keys seal rotate`
    new_pub = tmp_path / "seal-2.pub.pem"
    new_pub.write_bytes(public)
    sealed = Protector.load("FI", new_pub).protect(NUMBER).tail_sealed or ""  # a renewed agent
    with pytest.raises(SealError):
        first.open(sealed)
    assert cache.keyring() is not first and cache.keyring().open(sealed) == "567"

    os.chmod(keys.seal_private, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        cache.keyring()
    os.chmod(keys.seal_private, 0o600)
    cache.keyring()
    keys.seal_private.unlink()
    with pytest.raises(KeyFileError, match="not found"):
        cache.keyring()
