"""Master-key rotation with calls still streaming (issue 19): ``rewrap_all`` re-wraps
live calls' data keys as it does stored recordings', so the old master key can be
retired mid-call and the call goes on, is finished and archived under the new one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc

from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import KeyFileError, read_key_file
from agent.store.archive.vault import open_storage
from agent.store.catalog import live_recordings
from agent.store.keys.master import (
    FileKeyWrapper,
    add_master_key,
    keys_in_use,
    retire_master_key,
    rewrap_all,
)
from tests.support.audio import probe
from tests.support.stack import InProcessStore, store_config
from tests.test_live_store import (
    SECOND,
    append,
    archive_audio,
    finish,
    live_manifest,
    pcm_of_leg,
    tone,
    wait_stored,
)


def test_rotation_mid_call_rewraps_the_live_key_and_the_call_goes_on(tmp_path: Path) -> None:
    config = dataclasses.replace(store_config(tmp_path), live_timeout_s=60.0)
    key_file = config.master_key_file
    manifest = live_manifest(tmp_path)
    rid = manifest.recording_id
    customer, employee = tone(3, 440), tone(3, 660)
    with InProcessStore(config) as store, grpc.insecure_channel(store.address) as channel:
        append(
            pb_grpc.LiveStub(channel),
            manifest,
            ("customer", 0, customer[: 2 * SECOND]),
            ("employee", 0, employee[: 2 * SECOND]),
        )
    [(old_id, _)] = read_key_file(key_file)
    new_id = add_master_key(key_file)  # rotate: the new key wraps new data keys

    storage = open_storage(config)
    try:
        assert keys_in_use(storage.catalog) == {old_id: 1}  # the live call's key
        try:
            retire_master_key(key_file, old_id, storage.catalog)
            raise AssertionError("retired a key a live call still needs")
        except KeyFileError as exc:
            assert "still wraps 1 data keys" in str(exc)
        assert rewrap_all(storage.catalog, FileKeyWrapper.load(key_file)) == 1
        assert keys_in_use(storage.catalog) == {new_id: 1}
        with storage.catalog.engine.connect() as conn:
            assert conn.execute(live_recordings.select()).one().key_id == new_id
        retire_master_key(key_file, old_id, storage.catalog)
    finally:
        storage.catalog.close()
    assert [k for k, _ in read_key_file(key_file)] == [new_id]

    # Only the new key is held now: the call's audio so far still opens, more is
    # appended under the same data key, and the archive is the whole call.
    with InProcessStore(config) as store, grpc.insecure_channel(store.address) as channel:
        assert pcm_of_leg(store, rid, "customer") == customer[: 2 * SECOND]
        stub = pb_grpc.LiveStub(channel)
        append(
            stub,
            manifest,
            ("customer", 2 * SECOND, customer[2 * SECOND :]),
            ("employee", 2 * SECOND, employee[2 * SECOND :]),
        )
        assert finish(stub, manifest, customer, employee).finished
        row = wait_stored(store, rid)
        channels, _, seconds = probe(archive_audio(store, row, tmp_path / "a.ogg"))
        assert channels == 2 and abs(seconds - 3.0) < 0.1
