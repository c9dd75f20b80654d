"""Many stores, one register (issue 18): three real `callrec store` processes on one
PostgreSQL catalog and one SeaweedFS bucket, behind a real HAProxy (Debian's; TCP mode,
TLS passed through to the stores, round robin per connection), one shared master key
file. Agents (the real ``Uplink`` in-process, six connections through the balancer)
upload while one replica is SIGKILLed and restarted twice and another is stopped
gracefully and started again; every sweeper runs every second meanwhile.

Full size: 2,000 recordings (run it with ``CALLREC_REPLICAS_RECORDINGS=2000``; README
"Running several stores" quotes the figures). CI runs 300, which keeps the test
within ~90 s on this kind of machine.
"""

# Fixtures are imported from tests.support.services; test arguments name them.

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import random
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from agent import logs
from agent.config import load_store_config
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.access import tokens
from agent.store.archive.vault import PARTIALS_PREFIX, Storage, open_storage
from agent.store.audit import chain as audit
from agent.store.audit.chain import audit_events
from agent.store.catalog import data_keys, now_ms, recordings
from agent.store.ingest.s3_partials import WINDOW_BYTES
from tests.support.access_world import PEOPLE
from tests.support.pki import Pki, make_pki
from tests.support.replicas import HAPROXY, Agents, StoreReplicas
from tests.support.services import (
    Postgres,
    SeaweedFS,
    make_row,
    postgres,  # noqa: F401 (fixture)
    seaweed,  # noqa: F401 (fixture)
)
from tests.support.stack import Keys, make_keys
from tests.test_ingest_limits import manifest_for, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy not installed (.ci/setup)"),
]

CI_RECORDINGS = 300
EXPIRED = 150  # recordings past their retention, for the sweepers to destroy meanwhile
CHUNK = 256 * 1024


@dataclass
class Cluster:
    root: Path
    pki: Pki
    keys: Keys
    stores: StoreReplicas
    storage: Storage  # the shared catalog and bucket, read by the test itself
    expired: set[str]

    def ingest(self, address: str) -> pb_grpc.IngestStub:
        d = self.pki.directory
        creds = grpc.ssl_channel_credentials(
            (d / "ca.pem").read_bytes(), (d / "agent-hel-1.key").read_bytes(),
            (d / "agent-hel-1.pem").read_bytes(),
        )  # fmt: skip
        options = [("grpc.use_local_subchannel_pool", 1)]
        return pb_grpc.IngestStub(grpc.secure_channel(address, creds, options=options))

    def access(self, address: str) -> apb_grpc.AccessStub:
        creds = grpc.ssl_channel_credentials((self.pki.directory / "ca.pem").read_bytes())
        options = [("grpc.use_local_subchannel_pool", 1)]
        return apb_grpc.AccessStub(grpc.secure_channel(address, creds, options=options))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: Postgres,  # noqa: F811 (fixture)
    seaweed: SeaweedFS,  # noqa: F811 (fixture)
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    pki, keys = make_pki(root / "pki"), make_keys(root / "seal")
    (root / "people.toml").write_text(PEOPLE)
    (root / "store-keys").mkdir()
    shared = {
        "catalog": postgres.new_database(),
        "blobs": "s3",
        "s3": seaweed.s3_section(seaweed.new_bucket()),
        "keys": {"master_key_file": str(root / "store-keys" / "master.key")},
        "tls": pki.store_tls,
        "directory_file": str(root / "people.toml"),
        "seal_key_file": str(keys.seal_private),
        "sweep_interval": "1s",
        "sweep_batch": 10,
        "orphan_grace": "8s",
    }
    stores = StoreReplicas(root, 3, shared)
    storage = open_storage(
        load_store_config(stores.config_file(0))
    )  # migrates the catalog, makes the one master key
    expired = {_seed_expired(storage, root) for _ in range(EXPIRED)}
    stores.start()
    try:
        yield Cluster(root, pki, keys, stores, storage, expired)
    finally:
        stores.close()
        storage.catalog.close()


def _seed_expired(storage: Storage, root: Path) -> str:
    rid = secrets.token_hex(16)
    source = root / f"{rid}.src"
    source.write_bytes(os.urandom(2000))
    blob_key = storage.vault.store(rid, source, root)
    source.unlink()
    ended = now_ms() - 220 * 86_400_000
    assert storage.catalog.insert(make_row(rid, blob_key, ended))
    return rid


def _fields(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, object]]:
    return [
        getattr(r, logs.FIELDS_ATTR)
        for r in caplog.records
        if getattr(r, logs.EVENT_ATTR, "") == event
    ]


# ---------------------------------------------------------------- a cut upload


def test_an_upload_cut_by_a_killed_replica_resumes_on_another(cluster: Cluster) -> None:
    """The stream goes to r0 directly; r0 is SIGKILLed with part of a window unwritten;
    the agent's retry goes through the balancer to another replica, which continues
    from the durable offset: what is sent again is at most one window."""
    data = os.urandom(3 * 1024 * 1024 + 1000)
    manifest = manifest_for(data, "hel-1")
    cut_at = 10 * CHUNK  # 2.5 MiB sent: two windows written, half of one held by r0
    query = pb.QueryUploadRequest(recording_id=manifest.recording_id)
    r0, r1 = cluster.stores.replicas[:2]
    sent = threading.Event()
    release = threading.Event()

    def stream() -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(manifest=manifest)
        for offset in range(0, cut_at, CHUNK):
            yield pb.UploadRequest(
                chunk=pb.Chunk(offset=offset, data=data[offset : offset + CHUNK])
            )
        sent.set()
        release.wait(60)

    on_r0 = cluster.ingest(r0.address).Upload.future(stream(), timeout=120)
    assert sent.wait(30)
    other = cluster.ingest(r1.address)
    wait_until(lambda: other.QueryUpload(query, timeout=10).committed_size >= 2 * WINDOW_BYTES, 30)
    time.sleep(0.5)  # r0 has received the rest of what was sent, and holds it
    cluster.stores.kill(0)
    release.set()
    with pytest.raises(grpc.RpcError):
        on_r0.result(timeout=30)
    through = cluster.ingest(cluster.stores.address)
    committed = through.QueryUpload(query, timeout=10).committed_size
    resent = cut_at - committed
    print(
        f"cut at {cut_at} B, durable {committed} B: {resent} B sent again (window {WINDOW_BYTES})"
    )
    assert 0 <= resent <= WINDOW_BYTES, "at most one window is sent again"
    assert committed == 2 * WINDOW_BYTES, "the windows written before the kill survive it"
    rest = [pb.UploadRequest(manifest=manifest)] + [
        pb.UploadRequest(chunk=pb.Chunk(offset=o, data=data[o : o + CHUNK]))
        for o in range(committed, len(data), CHUNK)
    ]
    rest.append(pb.UploadRequest(finish=pb.Finish(size=len(data), sha256=manifest.sha256)))
    receipt = through.Upload(iter(rest), timeout=60)
    assert receipt.sha256 == hashlib.sha256(data).hexdigest()
    line = f"event=recording_stored recording_id={manifest.recording_id}"
    stored_by = [n for n, text in cluster.stores.logs().items() if line in text]
    assert len(stored_by) == 1 and stored_by != ["r0"]
    cluster.stores.restart(0)
    row = cluster.storage.catalog.get(manifest.recording_id)
    assert row is not None
    assert b"".join(cluster.storage.vault.read(row.recording_id, row.blob_key)) == data


# ---------------------------------------------------------------- many uploads, faults


class Chaos:
    """Faults by progress (share of the recordings stored), not by time: r0 SIGKILLed
    and restarted at 15 % and 65 %, r1 stopped gracefully at 35 % and started at 55 %."""

    def __init__(self, cluster: Cluster, agents: Agents, total: int) -> None:
        self.cluster, self.agents, self.total = cluster, agents, total
        self.steps = [(0.15, "kill", 0), (0.35, "stop", 1), (0.55, "start", 1), (0.65, "kill", 0)]
        self.done: list[str] = []
        self.exit_codes: list[int | None] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stores = self.cluster.stores
        for share, action, i in self.steps:
            while 1 - self.agents.left() / self.total < share:
                time.sleep(0.05)
            if action == "kill":
                stores.kill(i)
                time.sleep(0.5)
                stores.restart(i)
            elif action == "stop":
                self.exit_codes.append(stores.stop(i))
            else:
                stores.restart(i)
            self.done.append(f"{action} r{i} at {share:.0%}")


@pytest.mark.timeout(1800)  # the full size by hand; CI's is bounded by wait_empty below
def test_uploads_through_the_balancer_survive_killed_and_stopped_replicas(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    total = int(os.environ.get("CALLREC_REPLICAS_RECORDINGS", CI_RECORDINGS))
    rng = random.Random(18)
    agents = Agents(cluster.root / "agent", cluster.keys, cluster.pki, cluster.stores.address)
    ended = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    for n in range(total):  # calls of a few seconds of Opus; every 40th a long one
        agents.add(os.urandom(1_500_000 if n % 40 == 7 else rng.randint(8_000, 40_000)), ended)
    chaos = Chaos(cluster, agents, total)
    started = time.monotonic()
    agents.start()
    chaos.thread.start()
    try:
        agents.wait_empty(timeout=60 + total * 0.5)
    finally:
        chaos.thread.join(60)
        agents.close()
    seconds = time.monotonic() - started
    uploaded = _fields(caplog, "recording_uploaded")
    resumed = [u for u in uploaded if int(str(u["resumed_at"])) > 0]
    print(f"{total} recordings in {seconds:.1f} s ({total / seconds:.1f}/s); faults: "
          f"{chaos.done}; {len(resumed)} resumed after a cut")  # fmt: skip
    assert len(chaos.done) == 4, f"the faults did not all happen: {chaos.done}"
    assert chaos.exit_codes == [0], "a replica stops gracefully when asked"
    _assert_stored_exactly_once(cluster, agents.made)
    _assert_nothing_orphaned(cluster, agents.made)
    _assert_sweepers_ran(cluster)


def _assert_stored_exactly_once(cluster: Cluster, made: dict[str, str]) -> None:
    storage = cluster.storage
    with storage.catalog.engine.connect() as conn:
        rows = conn.execute(
            sa.select(recordings.c.recording_id, recordings.c.sha256, recordings.c.blob_key)
        ).all()
    stored = {r.recording_id: r for r in rows}
    assert made.keys() <= stored.keys(), f"{len(made.keys() - stored.keys())} never stored"
    for rid, sha in made.items():  # every one decrypts to the agent's sha256
        row = stored[rid]
        plain = b"".join(storage.vault.read(rid, row.blob_key))
        assert row.sha256 == sha == hashlib.sha256(plain).hexdigest(), rid


def _orphans(cluster: Cluster, made: dict[str, str]) -> dict[str, int]:
    storage = cluster.storage
    has_row = sa.exists().where(recordings.c.blob_key == data_keys.c.blob_key)
    with storage.catalog.engine.connect() as conn:
        keys_without_row = conn.execute(
            sa.select(sa.func.count()).select_from(data_keys).where(~has_row)
        ).scalar_one()
        blob_keys = set(conn.execute(sa.select(recordings.c.blob_key)).scalars())
    in_bucket = set(storage.blobs.keys())
    s3 = storage.blobs.client  # type: ignore[attr-defined]
    bucket = storage.blobs.bucket  # type: ignore[attr-defined]
    partial = s3.list_objects_v2(Bucket=bucket, Prefix=PARTIALS_PREFIX).get("KeyCount", 0)
    local = sum(len(list((r.daemon.log.parent / "data" / "incoming").iterdir()))
                for r in cluster.stores.replicas)  # fmt: skip
    return {
        "keys_without_row": int(keys_without_row),
        "blobs_without_row": len(in_bucket - blob_keys),
        "rows_without_blob": len(blob_keys - in_bucket),
        "shared_partials": int(partial),
        "local_partials": local,
    }


def _assert_nothing_orphaned(cluster: Cluster, made: dict[str, str]) -> None:
    """What the kills left (a key and blob without their row, a partial upload, a
    temporary file) is removed by the replicas' own sweepers after the grace period."""
    deadline = time.monotonic() + 40
    while (found := _orphans(cluster, made)) != dict.fromkeys(found, 0):
        assert time.monotonic() < deadline, f"orphans remain: {found}"
        time.sleep(1)
    with cluster.storage.catalog.engine.connect() as conn:
        per_recording = conn.execute(
            sa.select(data_keys.c.recording_id, sa.func.count())
            .group_by(data_keys.c.recording_id)
            .having(sa.func.count() > 1)
        ).all()
    assert per_recording == [], "one data key (and blob) per recording"


def _assert_sweepers_ran(cluster: Cluster) -> None:
    for name, text in cluster.stores.logs().items():
        assert "event=sweep_done" in text, f"{name}'s sweeper never ran"
    storage = cluster.storage
    remaining = {r.recording_id for r in storage.catalog.list(limit=100_000)}
    assert not cluster.expired & remaining, "every expired recording destroyed"
    with storage.catalog.engine.connect() as conn:
        destroyed = conn.execute(
            sa.select(audit_events.c.recording_id, sa.func.count())
            .where(audit_events.c.action == "destroy")
            .group_by(audit_events.c.recording_id)
        ).all()
    counts = {rid: n for rid, n in destroyed}
    assert set(counts) == cluster.expired and set(counts.values()) == {1}
    verdict = audit.verify(storage.catalog)
    assert verdict.ok, verdict


# ---------------------------------------------------------------- people, through it


def test_people_search_and_play_through_the_balancer_and_every_replica(cluster: Cluster) -> None:
    agents = Agents(cluster.root / "agent-people", cluster.keys, cluster.pki,
                    cluster.stores.address, clients=1)  # fmt: skip
    for _ in range(4):
        agents.add(os.urandom(20_000))
    agents.start()
    try:
        agents.wait_empty(timeout=60)
    finally:
        agents.close()
    with cluster.storage.catalog.engine.begin() as conn:
        token = tokens.create_token(conn, "s1", "test").token
    md = (("authorization", f"Bearer {token}"),)
    search = apb.SearchRequest(purpose=apb.PURPOSE_VERIFICATION, reason="case 18",
                               employee_id="a1")  # fmt: skip
    found = cluster.access(cluster.stores.access_address).Search(search, metadata=md, timeout=20)
    ids = [v.info.manifest.recording_id for v in found.recordings]
    assert ids, "the supervisor finds the team's calls through the balancer"
    addresses = [cluster.stores.access_address] + [
        f"127.0.0.1:{r.access_port}" for r in cluster.stores.replicas
    ]
    for address, rid in zip(addresses, ids, strict=False):
        play = apb.RecordingRequest(purpose=apb.PURPOSE_VERIFICATION, reason="case 18",
                                    recording_id=rid)  # fmt: skip
        audio = b"".join(
            c.data for c in cluster.access(address).Play(play, metadata=md, timeout=30)
        )
        row = cluster.storage.catalog.get(rid)
        assert row is not None and hashlib.sha256(audio).hexdigest() == row.sha256, address


def test_the_readme_balancer_example_is_valid_haproxy(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Running several stores", 1)[1].split("\n## ", 1)[0]
    [example] = [b for b in section.split("```")[1::2] if "haproxy.cfg" in b]
    config = tmp_path / "haproxy.cfg"
    config.write_text(example.lstrip("\n"))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(config)], check=False, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "mode tcp" in example and "balance roundrobin" in example
