"""Key custody (issue 14): nothing an agent host or a copy of the catalog holds lets
anyone rebuild a customer's number. Each test plays the attacker: it takes what that
party holds and tries all 1000 candidates for the hidden digits.

Finding a data subject's calls still works (masked form + time, sealed tails opened
by the store) on SQLite and PostgreSQL, across a seal-key rotation, and every find
and unseal is in the audit log."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from agent.config import store_config_from_dict
from agent.manifest import timestamp
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import Protector, Sealer, new_seal_keypair
from agent.recorder.finalize import MANIFEST_FILE, Finalizer
from agent.recorder.uplink.client import Uplink
from agent.recorder.uplink.outbox import Outbox
from agent.store.catalog import MIGRATIONS, Catalog, from_ms, now_ms, recordings
from agent.store.keys.numbers import rotate_seal_key
from tests.support.access_world import World, opus_audio, running_world, write_private
from tests.support.services import Postgres, make_row, postgres  # noqa: F401 (fixture)
from tests.support.stack import InProcessStore, Keys, make_keys
from tests.test_spool import deliver_pair, make_spool, wait_for

NUMBER = "+358401234567"
MINUTE = 60_000


def candidates(masked: str) -> list[str]:
    """Every number a masked form stands for."""
    return [masked[:-3] + f"{n:03d}" for n in range(1000)]


def unkeyed_forms(number: str) -> list[bytes]:
    """What an attacker without any key can compute from a guess and look for."""
    text = number.encode()
    return [
        text,
        text[1:],
        hashlib.sha256(text).hexdigest().encode(),
        hashlib.sha256(text[1:]).hexdigest().encode(),
        hashlib.sha1(text).hexdigest().encode(),
        hashlib.md5(text).hexdigest().encode(),
    ]


def brute_force(blobs: list[bytes], masked: str, secrets_held: list[bytes]) -> list[str]:
    """The attack: each candidate, unkeyed and under every secret the attacker holds
    (HMAC-SHA256, as the lookup digest was made), searched in everything they hold."""
    hits = []
    everything = b"\n".join(blobs)
    for guess in candidates(masked):
        forms = unkeyed_forms(guess)
        forms += [
            hmac.new(k, guess.encode(), hashlib.sha256).hexdigest().encode() for k in secrets_held
        ]
        if any(form in everything for form in forms):
            hits.append(guess)
    return hits


def host_secrets(root: Path) -> list[bytes]:
    """Every 32-byte secret an attacker finds in a directory: raw files of 32 bytes
    and base64 values in ``<id> <base64>`` key lines."""
    found: list[bytes] = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if len(data) == 32:
            found.append(data)
        for match in re.finditer(rb"[A-Za-z0-9+/]{43}=", data):
            found.append(base64.b64decode(match.group()))
    return found


# ---------------------------------------------------------------- an agent host


def test_agent_host_files_give_a_guess_nothing_to_match(
    tmp_path: Path, keys: Keys, store: InProcessStore
) -> None:
    """capture.json, the outbox manifest, the config and key files of an agent that
    recorded the same number twice: no lookup key, no digest, and every candidate
    (unkeyed, or under any secret found on the host) finds nothing."""
    agent_keys = tmp_path / "agent-keys"
    agent_keys.mkdir()
    shutil.copy(keys.seal_public, agent_keys / "seal.pub.pem")
    spool = make_spool(tmp_path, keys, store.address)
    spool.pickup.start()
    try:
        deliver_pair(spool.dir, "c1")
        deliver_pair(spool.dir, "c2", seconds=1.5)  # other audio: not a duplicate
        wait_for(lambda: len(spool.captures()) == 2)
    finally:
        spool.pickup.stop()
        spool.pickup.join(10)
    sealed: list[str] = []
    rids = spool.captures()
    for rid in rids:
        doc = json.loads((spool.ready / rid / "capture.json").read_text())
        assert set(doc["customer"]) == {"kind", "masked", "tail_sealed"}, doc["customer"]
        assert doc["customer"]["masked"] == "+358401234***"
        sealed.append(doc["customer"]["tail_sealed"])
        Finalizer(spool.cfg).handle(rid)
        manifest = (spool.cfg.outbox_dir / rid / MANIFEST_FILE).read_text()
        assert "digest" not in manifest.lower(), manifest
    assert sealed[0] != sealed[1], "the same number seals differently each time"
    assert spool.cfg.privacy.lookup_key_file is None
    assert not list(tmp_path.rglob("lookup.key"))

    host = [tmp_path / "agent-data", agent_keys, tmp_path / "people.toml"]
    blobs = [p.read_bytes() for d in host for p in ([d] if d.is_file() else d.rglob("*"))
             if p.is_file()]  # fmt: skip
    held = [s for d in host if d.is_dir() for s in host_secrets(d)]
    assert held, "the attack uses the secrets found on the host (spool index key)"
    assert brute_force(blobs, "+358401234***", held) == []
    # Re-sealing each candidate with the public key never reproduces a stored tail.
    sealer = Sealer.load(agent_keys / "seal.pub.pem")
    assert not {sealer.seal(g[-3:]) for g in candidates("+358401234***")} & set(sealed)

    uplink = Uplink(spool.cfg.uplink, Outbox(spool.cfg.outbox_dir), spool.cfg.quarantine_dir)
    try:
        for rid in rids:
            uplink.handle(rid)
    finally:
        uplink.close()
    catalog = Catalog(store.config.catalog_url)
    rows = [catalog.get(rid) for rid in rids]
    catalog.close()
    assert all(r is not None and r.customer_digest is None for r in rows)


# ---------------------------------------------------------------- a copy of the catalog


def _manifest(rid: str, started_ms: int, sealed: str, digest: str = "") -> pb.Manifest:
    audio = opus_audio()
    return pb.Manifest(
        recording_id=rid, site="hel-1", source="siprec", call_ref="c" * 16,
        direction=pb.DIRECTION_INBOUND, started_at=timestamp(from_ms(started_ms)),
        ended_at=timestamp(from_ms(started_ms + 30_000)), service_number="+3581005577",
        customer=pb.Customer(kind="number", masked="+358401234***", tail_sealed=sealed,
                             digest=digest, digest_key_id="k1" if digest else ""),
        employees=[pb.Employee(id="a1", name="Aino Agent", aor="sip:1001@pbx",
                               team="parcels", joined_at=timestamp(from_ms(started_ms)))],
        audio_format="opus", size=len(audio), sha256=hashlib.sha256(audio).hexdigest(),
        channels=2, region="fi",
    )  # fmt: skip


def _upload(address: str, manifest: pb.Manifest) -> None:
    audio = opus_audio()
    requests = [
        pb.UploadRequest(manifest=manifest),
        pb.UploadRequest(chunk=pb.Chunk(offset=0, data=audio)),
        pb.UploadRequest(finish=pb.Finish(size=manifest.size, sha256=manifest.sha256)),
    ]
    with grpc.insecure_channel(address) as channel:
        receipt = pb_grpc.IngestStub(channel).Upload(iter(requests), timeout=30)
    assert receipt.recording_id == manifest.recording_id


def test_catalog_copy_rebuilds_no_number_even_with_an_old_agents_lookup_key(
    tmp_path: Path, keys: Keys
) -> None:
    """An agent of the old kind sends HMAC(lookup.key, number): the store drops it.
    A copy of the catalog's files, attacked with that very lookup key (every agent
    host had it) and without, finds none of the 1000 candidates."""
    old_lookup_key = secrets.token_bytes(32)
    old_digest = hmac.new(old_lookup_key, NUMBER.encode(), hashlib.sha256).hexdigest()
    sealer = Sealer.load(keys.seal_public)
    section = {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "store-data"),
               "tls": {"insecure": True}, "seal_key_file": str(keys.seal_private)}  # fmt: skip
    doc = {"store": section}
    started = now_ms() - 86_400_000
    with InProcessStore(store_config_from_dict(doc, tmp_path)) as store:
        _upload(store.address, _manifest(secrets.token_hex(16), started, sealer.seal("567"),
                                         old_digest))  # fmt: skip
        _upload(store.address, _manifest(secrets.token_hex(16), started, sealer.seal("567")))
        db = Path(store.config.catalog_url.removeprefix("sqlite:///"))
        copy = tmp_path / "stolen.sqlite3"
        with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
            source.backup(target)  # what a backup or a DBA's dump holds, WAL included
    files = [p.read_bytes() for p in [copy, *db.parent.glob("catalog.sqlite3*")]]
    with sqlite3.connect(copy) as conn:
        rows = conn.execute("SELECT * FROM recordings").fetchall()
        digests = conn.execute("SELECT customer_digest, customer_digest_key_id FROM recordings")
        assert digests.fetchall() == [(None, None), (None, None)]
    assert len(rows) == 2
    dump = [repr(rows).encode(), *files]
    assert brute_force(dump, "+358401234***", [old_lookup_key]) == []
    assert old_digest.encode() not in b"".join(dump)


def test_migration_empties_the_digests_agents_made(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    catalog = Catalog(url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with catalog.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    digest = hmac.new(b"k" * 32, NUMBER.encode(), hashlib.sha256).hexdigest()
    row = make_row("a" * 32, "a" * 32 + "-x", now_ms(), customer_digest=digest,
                   customer_digest_key_id="k1")  # fmt: skip
    with catalog.engine.begin() as conn:
        later = {"pauses_json"}  # columns of migrations after 0004
        conn.execute(
            sa.insert(recordings), [{k: v for k, v in vars(row).items() if k not in later}]
        )
    catalog.migrate()
    stored = catalog.get("a" * 32)
    catalog.close()
    assert stored is not None and stored.customer_digest is None
    assert stored.customer_digest_key_id is None and stored.customer_masked == "+358401234***"


# ---------------------------------------------------------------- finding, on both engines


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    keys = make_keys(tmp_path / "keys")
    (tmp_path / "store-keys").mkdir()
    keyring = write_private(tmp_path / "store-keys" / "seal.pem", keys.seal_private.read_text())
    extra = {}
    if request.param == "postgresql":
        pg: Postgres = request.getfixturevalue("postgres")
        extra["catalog"] = pg.new_database()
        extra["shared_blobs_dir"] = str(tmp_path / "blobs")  # one store: its own directory
    yield from running_world(tmp_path, keys, seal=keyring, **extra)


def _find(world: World, number: str, at_ms: int, person: str = "po") -> set[str]:
    at = apb.FindByNumberRequest().at
    at.FromMilliseconds(at_ms)
    request = apb.FindByNumberRequest(
        purpose=apb.PURPOSE_LEGAL, reason="DSR-1", number=number, at=at, window_minutes=15
    )
    response = world.access.FindByNumber(request, metadata=world.md(person))
    return {v.info.manifest.recording_id for v in response.recordings}


def test_find_across_a_seal_key_rotation_and_every_use_is_audited(world: World) -> None:
    t = now_ms() - 3 * 86_400_000
    before = world.upload(t, "040 123 4567", world.keys.protector())
    assert world.config.seal_key_file is not None
    new_public = world.root / "seal-new.pub.pem"
    new_public.write_bytes(rotate_seal_key(world.config.seal_key_file))
    new = Protector.load("FI", new_public)
    after = world.upload(t + 5 * MINUTE, "+358401234567", new)
    neighbour = world.upload(t + 2 * MINUTE, "+358401234568", new)  # same masked form
    seq = world.head_seq()

    assert _find(world, "0401234567", t + 2 * MINUTE) == {before, after}
    assert _find(world, "040 123 4568", t) == {neighbour}
    events = world.events_after(seq)
    finds = [(e["action"], e["outcome"], e["recording_id"], e["detail"]) for e in events]
    assert finds == [
        ("find_by_number", "allowed", before, "channel=cli matches=2 opened=3 window=+-15m"),
        ("find_by_number", "allowed", after, "channel=cli matches=2 opened=3 window=+-15m"),
        ("find_by_number", "allowed", neighbour, "channel=cli matches=1 opened=3 window=+-15m"),
    ]
    for event in events:
        # Hashes, ids, times and sequence numbers may hold any digit run; the words may not.
        said = [event[k] for k in ("actor", "action", "reason", "outcome", "purpose", "detail")]
        assert "567" not in json.dumps(said, default=str) and "1234" not in event["detail"]

    seq = world.head_seq()
    unseal = apb.RecordingRequest(purpose=apb.PURPOSE_LEGAL, reason="DSR-1", recording_id=before)
    assert world.access.OpenSealedDigits(unseal, metadata=world.md("po")).last_digits == "567"
    with pytest.raises(grpc.RpcError) as denied:
        world.access.OpenSealedDigits(unseal, metadata=world.md("a1"))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    outcomes = [(e["action"], e["actor"], e["outcome"]) for e in world.events_after(seq)]
    assert outcomes == [("unseal", "person:po", "allowed"), ("unseal", "person:a1", "denied")]


def test_an_agent_sealing_to_a_key_the_store_lacks_is_found_by_nobody_and_said_so(
    world: World,
) -> None:
    """A seal the keyring cannot open: ingest flags the recording, the find does not
    match it, and an unseal is refused (FAILED_PRECONDITION) and audited."""
    stranger = world.root / "stranger.pub.pem"
    stranger.write_bytes(new_seal_keypair()[1])
    t = now_ms() - 2 * 86_400_000
    rid = world.upload(t, NUMBER, Protector.load("FI", stranger))
    good = world.upload(t + MINUTE, NUMBER, world.keys.protector())
    assert _find(world, NUMBER, t) == {good}
    flags = {r: world.storage.catalog.get(r).flags for r in (rid, good)}  # type: ignore[union-attr]
    assert flags == {rid: "customer_seal_unopenable", good: ""}, "ingest says which"
    seq = world.head_seq()
    unseal = apb.RecordingRequest(purpose=apb.PURPOSE_LEGAL, reason="DSR-2", recording_id=rid)
    with pytest.raises(grpc.RpcError) as err:
        world.access.OpenSealedDigits(unseal, metadata=world.md("po"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [(e["action"], e["outcome"]) for e in world.events_after(seq)] == [("unseal", "refused")]


def test_a_find_opens_a_bounded_number_of_tails(world: World) -> None:
    """More calls with one masked form in the window than a find may open: refused,
    with a message that says to narrow the window (and audited)."""
    from agent.store.keys import numbers

    t = now_ms() - 86_400_000
    rows = [vars(make_row(secrets.token_hex(16), secrets.token_hex(8), t + n * 10))
            for n in range(numbers.MAX_CANDIDATES + 1)]  # fmt: skip
    with world.storage.catalog.engine.begin() as conn:
        conn.execute(sa.insert(recordings), rows)
    seq = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        _find(world, NUMBER, t)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "narrow" in str(err.value.details())
    assert [e["outcome"] for e in world.events_after(seq)] == ["refused"]
