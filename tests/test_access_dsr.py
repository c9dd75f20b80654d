"""Data-subject requests against the real store: one customer's calls among thousands,
found from the number in another format and a time ±15 min (also across a seal-key
rotation); the export package plays; erasure leaves nothing readable by any path and
an audit record without personal data; held recordings survive the sweeper."""

from __future__ import annotations

import io
import json
import secrets
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from pydub import AudioSegment

from agent.cli import access as access_cli
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.privacy import Protector
from agent.store.archive.vault import KeyShredded
from agent.store.audit import chain as audit
from agent.store.audit.chain import audit_events
from agent.store.catalog import data_keys, from_ms, metadata, now_ms, recordings
from agent.store.keys.numbers import SealKeyring, rotate_seal_key
from agent.store.retention.sweeper import Sweeper
from tests.support.access_world import World, running_world, write_private
from tests.support.services import make_row, write_store_toml
from tests.support.stack import make_keys

T = now_ms() - 10 * 86_400_000  # the time the customer gives, ten days ago
MINUTE = 60_000
OTHERS = 3000


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("dsr")
    keys = make_keys(root / "keys")
    # The store's keyring after a rotation: a new key first, the one older calls were
    # sealed to after it; agents now hold the new public key.
    (root / "store-keys").mkdir()
    keyring = write_private(root / "store-keys" / "seal.pem", keys.seal_private.read_text())
    (root / "keys" / "seal-new.pub.pem").write_bytes(rotate_seal_key(keyring))
    assert len(SealKeyring.load(keyring).keys) == 2
    yield from running_world(root, keys, seal=keyring)


@pytest.fixture(scope="module")
def customer(world: World) -> dict[str, str]:
    """The customer's calls (through Ingest), decoys and thousands of other calls."""
    old = world.keys.protector()  # seals to the key before the rotation
    new = Protector.load("FI", world.root / "keys" / "seal-new.pub.pem")
    calls = {
        "before": world.upload(T - 10 * MINUTE, "+358 40 123 4567", old),
        "after": world.upload(T + 5 * MINUTE, "0401234567", new),  # after the key rotation
        "outside": world.upload(T - 40 * MINUTE, "+358401234567", old),
        "same_mask": world.upload(T, "+358 40 123 4568", new),  # +358401234*** too
    }
    _insert_others(world, OTHERS)
    return calls


def _insert_others(world: World, count: int) -> None:
    rows = []
    for n in range(count):
        start = T + (n - count // 2) * 2_000  # ±50 minutes around T
        rid = secrets.token_hex(16)
        masked = f"+3584{n:07d}"[:-3] + "***"
        row = make_row(rid, f"{rid}-x", start + 60_000, customer_masked=masked,
                       customer_tail_sealed=secrets.token_urlsafe(32))  # fmt: skip
        rows.append(vars(row))
    with world.storage.catalog.engine.begin() as conn:
        conn.execute(sa.insert(recordings), rows)


def _find(world: World, number: str, at_ms: int) -> set[str]:
    at = apb.FindByNumberRequest().at
    at.FromMilliseconds(at_ms)
    request = apb.FindByNumberRequest(
        purpose=apb.PURPOSE_LEGAL, reason="DSR-2026-0042", number=number, at=at, window_minutes=15
    )
    response = world.access.FindByNumber(request, metadata=world.md("po"))
    return {v.info.manifest.recording_id for v in response.recordings}


def test_officer_finds_exactly_the_customers_calls(
    world: World, customer: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    expected = {customer["before"], customer["after"]}
    assert _find(world, "040-123 45 67", T + 3 * MINUTE) == expected
    assert _find(world, "00358 40 1234567", T - 2 * MINUTE) == expected
    assert _find(world, "tel:+358401234567", T + 40 * MINUTE) == set(), "outside ±15 min"
    assert _find(world, "+358 40 123 4568", T) == {customer["same_mask"]}
    for leak in ("1234567", "123 45 67", "123 4567"):
        assert leak not in caplog.text, "the full number was logged"
    _assert_number_not_at_rest(world)


def _assert_number_not_at_rest(world: World) -> None:
    """Not in any table, and not in the catalog's files on disk (WAL included)."""
    with world.storage.catalog.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                assert "401234567" not in str(tuple(row)), table.name
    data = b"".join(p.read_bytes() for p in world.config.data_dir.glob("catalog.sqlite3*"))
    assert b"401234567" not in data


def test_export_package_plays(
    world: World, customer: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the CLI, as the officer would: `callrec dsr export … --out pkg.zip`."""
    token = tmp_path / "token"
    token.write_text(world.tokens["po"])
    ids = [customer["before"], customer["after"]]
    out = tmp_path / "package.zip"
    parser = _parser()
    client = ["--store", world.store.address, "--token-file", str(token)]
    argv = ["dsr", "export", *ids, "--out", str(out), "--reason", "DSR-7", *client]
    args = parser.parse_args(argv)
    assert access_cli.dispatch(args) == 0, capsys.readouterr().err
    with zipfile.ZipFile(out) as package:
        meta = json.loads(package.read("metadata.json"))
        assert [r["recording_id"] for r in meta["recordings"]] == ids
        for item in meta["recordings"]:
            assert item["customer_number"] == "+358401234***"
            assert "digest" not in json.dumps(item)
            audio = AudioSegment.from_file(io.BytesIO(package.read(item["audio_file"])), "ogg")
            assert 900 <= len(audio) <= 1100 and audio.channels == 2 and audio.rms > 100


def test_cli_find_takes_the_number_from_stdin_never_from_argv(
    world: World,
    customer: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = tmp_path / "token"
    token.write_text(world.tokens["po"])
    at = from_ms(T + 3 * MINUTE).isoformat()
    find = ["dsr", "find", "--at", at, "--reason", "DSR-9", "--store", world.store.address,
            "--token-file", str(token)]  # fmt: skip
    seq = world.head_seq()
    args = _parser().parse_args([*find, "--number", "0401234567"])
    assert access_cli.dispatch(args) == 2
    err = capsys.readouterr().err
    assert "--number is refused" in err and "0401234567" not in err
    assert world.events_after(seq) == [], "nothing was asked"
    monkeypatch.setattr(sys, "stdin", io.StringIO("040 123 4567\n"))
    assert access_cli.dispatch(_parser().parse_args(find)) == 0
    out = capsys.readouterr().out
    assert customer["before"] in out and customer["after"] in out
    assert "2 recording(s)" in out


def _parser() -> access_cli.argparse.ArgumentParser:
    parser = access_cli.argparse.ArgumentParser(prog="callrec")
    access_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def _erase(world: World, rid: str, reason: str = "DSR-2026-0042 erasure") -> apb.ChangeResult:
    request = apb.RecordingRequest(purpose=apb.PURPOSE_LEGAL, reason=reason, recording_id=rid)
    return world.access.Erase(request, metadata=world.md("po"))


def test_erased_audio_cannot_be_read_by_any_path(world: World, customer: dict[str, str]) -> None:
    rid = customer["outside"]
    row = world.storage.catalog.get(rid)
    assert row is not None
    assert _erase(world, rid).changed
    # API
    for call in (world.access.GetRecording, world.access.Play):
        request = apb.RecordingRequest(purpose=apb.PURPOSE_LEGAL, reason="x", recording_id=rid)
        with pytest.raises(grpc.RpcError) as err:
            list(call(request, metadata=world.md("po")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rid not in _find(world, "+358401234567", T - 40 * MINUTE)
    # blob store and keys
    assert row.blob_key not in set(world.storage.blobs.keys())
    assert not list(world.config.blobs_dir.rglob(f"{rid}*"))
    with pytest.raises(KeyShredded):
        world.storage.vault.data_key(rid, row.blob_key)
    # catalog: no trace outside the audit log
    with world.storage.catalog.engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table is not audit_events:
                assert rid not in str(conn.execute(sa.select(table)).all()), table.name
        assert not conn.execute(sa.select(data_keys).where(data_keys.c.recording_id == rid)).all()
        events = audit.events_for(conn, rid)
    erase = [(e.actor, e.purpose, e.reason, e.outcome) for e in events if e.action == "erase"]
    assert erase == [("person:po", "legal", "DSR-2026-0042 erasure", "allowed")]
    destroy = [(e.actor, e.reason, e.outcome) for e in events if e.action == "destroy"]
    assert destroy == [("person:po", "erasure", "destroyed")]
    for event in events:  # who, what, why — nothing about the customer or the employee
        text = str(tuple(event))
        assert row.customer_masked not in text and "Aino" not in text
        assert str(row.customer_digest) not in text


def test_held_recording_is_not_erased_and_survives_the_sweeper(world: World) -> None:
    seven_months_ago = now_ms() - 215 * 86_400_000
    rid = world.seed([("a1", "Aino Agent", "parcels")], started_ms=seven_months_ago)
    hold = apb.RecordingRequest(purpose=apb.PURPOSE_LEGAL, reason="lawsuit 77", recording_id=rid)
    assert world.access.Hold(hold, metadata=world.md("po")).changed
    with pytest.raises(grpc.RpcError) as err:
        _erase(world, rid)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    sweeper = Sweeper(world.storage.catalog, world.storage.vault, retention_months=6)
    sweeper.run_once()
    assert world.storage.catalog.get(rid) is not None, "held: kept past its retention"
    assert world.access.Release(hold, metadata=world.md("po")).changed
    sweeper.run_once()
    assert world.storage.catalog.get(rid) is None, "released: swept"
    with world.storage.catalog.engine.connect() as conn:
        actions = [(e.action, e.outcome) for e in audit.events_for(conn, rid)]
    assert actions == [("hold", "allowed"), ("erase", "refused"), ("release", "allowed"),
                       ("destroy", "destroyed")]  # fmt: skip


def test_audit_log_verifies_after_all_this(world: World, tmp_path: Path) -> None:
    config = write_store_toml(tmp_path / "store.toml", world.doc["store"])
    args = _parser().parse_args(["audit", "verify", "--config", str(config)])
    assert access_cli.dispatch(args) == 0
    verdict = audit.verify(world.storage.catalog)
    assert verdict.ok and verdict.entries == world.head_seq()
