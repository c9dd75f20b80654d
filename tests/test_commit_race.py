"""A commit and an orphan sweep of the same data key never interleave (on SQLite and on
PostgreSQL): found by three replicas under load, where a commit outlived the orphan
grace period, a sweeper on another replica shredded its key as an orphan, and the
row was written anyway — a receipt for audio nobody can read. Now the commit writes
its row only while the key is whole, under the key row's lock, and the sweeper
re-checks for a row under the same lock."""

# Fixtures are imported from tests.support.services; test arguments name them.

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.store.archive.vault import KeyShredded, Storage, lock_whole_key, open_storage
from agent.store.catalog import RecordingRow, data_keys, now_ms
from tests.support.services import (
    Backend,
    backend,  # noqa: F401 (fixture)
    make_row,
    postgres,  # noqa: F401 (fixture)
    seaweed,  # noqa: F401 (fixture)
)


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:  # noqa: F811 (fixture)
    opened = open_storage(backend.config())
    yield opened
    opened.catalog.close()


def _stored_blob(storage: Storage, work: Path) -> tuple[str, str, bytes]:
    """What a commit has written before its row: the data key and the blob."""
    rid, data = secrets.token_hex(16), os.urandom(3000)
    source = work / rid
    source.write_bytes(data)
    return rid, storage.vault.store(rid, source, work), data


def _row(rid: str, blob_key: str, data: bytes) -> RecordingRow:
    return make_row(rid, blob_key, now_ms() - 60_000, size=len(data),
                    sha256=hashlib.sha256(data).hexdigest())  # fmt: skip


def test_a_commit_after_its_key_was_swept_as_an_orphan_writes_no_row(
    storage: Storage, tmp_path: Path
) -> None:
    rid, blob_key, data = _stored_blob(storage, tmp_path)
    assert storage.vault.discard_orphan(rid, blob_key)  # another replica's sweeper
    with pytest.raises(KeyShredded):
        storage.vault.commit_row(_row(rid, blob_key, data))
    assert storage.catalog.get(rid) is None, "no row, so no receipt: the agent sends again"


def test_a_sweeper_waits_for_a_commit_holding_the_key_and_then_keeps_it(
    storage: Storage, tmp_path: Path
) -> None:
    rid, blob_key, data = _stored_blob(storage, tmp_path)
    outcome: list[bool] = []
    with storage.catalog.engine.connect() as conn, conn.begin():  # a commit, mid-way
        assert lock_whole_key(conn, blob_key)
        sweeper = threading.Thread(
            target=lambda: outcome.append(storage.vault.discard_orphan(rid, blob_key))
        )
        sweeper.start()
        sweeper.join(1.5)
        assert sweeper.is_alive(), "the sweeper waits for the key row's lock"
        conn.execute(storage.catalog.insert_statement(_row(rid, blob_key, data)))
    sweeper.join(30)
    assert outcome == [False], "the row is there now: not an orphan"
    with storage.catalog.engine.connect() as c:
        wrapped = c.execute(
            sa.select(data_keys.c.wrapped_key).where(data_keys.c.blob_key == blob_key)
        ).scalar_one()
    assert wrapped is not None
    assert b"".join(storage.vault.read(rid, blob_key)) == data
