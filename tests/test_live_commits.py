"""The live path's group commit and running digests, on a real SQLite catalog and real
file blobs: appends waiting at the same moment share one transaction and each learns
its own outcome; a Finish's sha256 comes from what the store saw as appends landed, and
is read back from the segments when they are not the ones it saw (a discard and a
resend through another replica); a Finish carries the call's last bytes."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1.recordings_pb2_grpc import LiveStub
from agent.store.archive.vault import Storage, open_storage
from agent.store.live.commits import GroupCommit
from agent.store.live.segments import LiveRejected, LiveStore
from tests.support.services import Backend, backend, postgres, seaweed  # noqa: F401 (fixtures)
from tests.support.stack import InProcessStore, store_config
from tests.test_live_store import SECOND, append, finish, live_manifest, tone


@pytest.fixture
def storage(backend: Backend) -> Iterator[Storage]:  # noqa: F811
    """The catalog and blobs of a store: SQLite + files, PostgreSQL + S3 (SeaweedFS)."""
    opened = open_storage(backend.config())
    try:
        yield opened
    finally:
        opened.catalog.close()


def test_works_waiting_together_share_a_commit_and_keep_their_own_outcome(
    storage: Storage,
) -> None:
    engine = storage.catalog.engine
    table = sa.Table("group_t", sa.MetaData(), sa.Column("n", sa.Integer, primary_key=True))
    table.metadata.create_all(engine)
    group = GroupCommit(engine, LiveRejected)
    start = threading.Barrier(40)
    outcomes: dict[int, object] = {}

    def work(n: int) -> None:
        def insert(conn: sa.Connection) -> int:
            if n == 7:  # refused before writing: the others commit
                raise LiveRejected(grpc.StatusCode.ABORTED, "seven")
            conn.execute(sa.insert(table).values(n=n))
            return n * 10

        start.wait()
        try:
            outcomes[n] = group.run(insert, order=f"{n:03d}")
        except LiveRejected as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=work, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert {n: o for n, o in outcomes.items() if n != 7} == {n: n * 10 for n in range(40) if n != 7}
    assert isinstance(outcomes[7], LiveRejected)
    with engine.connect() as conn:
        stored = {n for (n,) in conn.execute(sa.select(table.c.n))}
    assert stored == set(range(40)) - {7}
    assert group.groups < 40  # some waited and went in another's commit

    # What runs after a commit cannot make a committed member raise.
    def broken_after(_: int) -> None:
        raise ValueError("after")

    def insert_100(conn: sa.Connection) -> int:
        conn.execute(sa.insert(table).values(n=100))
        return 100

    assert group.run(insert_100, broken_after) == 100
    with engine.begin() as conn:
        conn.execute(sa.delete(table).where(table.c.n == 100))

    # A transaction that fails fails every member (nothing of it is written).
    def duplicate(conn: sa.Connection) -> int:
        conn.execute(sa.insert(table).values(n=1))
        return 1

    with pytest.raises(sa.exc.IntegrityError):
        group.run(duplicate)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 39


def pieces(leg_bytes: bytes, offset: int) -> list[pb.LegBytes]:
    return [
        pb.LegBytes(leg=leg, offset=offset, data=leg_bytes[offset : offset + SECOND])
        for leg in ("customer", "employee")
    ]


def test_finish_digest_uses_what_it_saw_and_reads_back_what_changed(
    storage: Storage, tmp_path: Path
) -> None:
    # Two replicas: each its own LiveStore (running digests) over one catalog and blobs.
    here = LiveStore(storage.catalog, storage.vault, tmp_path / "here")
    there = LiveStore(storage.catalog, storage.vault, tmp_path / "there")
    old, new = tone(2, 440), tone(2, 660)
    seen, resent = live_manifest(tmp_path), live_manifest(tmp_path)
    for manifest in (seen, resent):
        assert here.create(manifest)

    # Everything landed here: the digest needs none of the blobs (they can go).
    row = here.get(seen.recording_id)
    assert row is not None
    here.append(row, pieces(old, 0))
    first = [k for k in list(storage.blobs.keys()) if k.startswith(f"live-{row.recording_id}")]
    here.append(row, pieces(old, SECOND))
    storage.blobs.delete_many(first)
    assert here.leg_digest(row, "customer") == (2 * SECOND, hashlib.sha256(old).hexdigest())

    # The agent's bytes differ: the other replica discards the audio, the agent sends
    # it again, the first second through the other replica and the next through this
    # one, at the very offset this store's digest ended.
    row = here.get(resent.recording_id)
    assert row is not None
    here.append(row, pieces(old, 0))
    there.discard_audio(row.recording_id)
    there.append(row, pieces(new, 0))
    here.append(row, pieces(new, SECOND))
    want = (2 * SECOND, hashlib.sha256(new).hexdigest())
    assert here.leg_digest(row, "customer") == want
    assert there.leg_digest(row, "employee") == want


def test_an_append_after_the_finish_is_refused_alone(storage: Storage, tmp_path: Path) -> None:
    live = LiveStore(storage.catalog, storage.vault, tmp_path / "live")
    done, going = live_manifest(tmp_path), live_manifest(tmp_path)
    for manifest in (done, going):
        assert live.create(manifest)
    done_row, going_row = live.get(done.recording_id), live.get(going.recording_id)
    assert done_row is not None and going_row is not None
    audio = tone(1, 440)
    live.append(done_row, pieces(audio, 0))
    legs = {leg: (SECOND, hashlib.sha256(audio).hexdigest()) for leg in ("customer", "employee")}
    final = pb.Manifest()
    final.CopyFrom(done)
    live.finish(done_row, final, legs)
    results: dict[int, object] = {}
    start = threading.Barrier(4)

    def send(index: int) -> None:
        row = going_row if index == 0 else done_row
        start.wait()
        try:
            results[index] = live.append(row, pieces(tone(2, 440), SECOND if index else 0))
        except LiveRejected as exc:
            results[index] = exc.code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {
        0: {"customer": SECOND, "employee": SECOND},
        **{i: grpc.StatusCode.FAILED_PRECONDITION for i in (1, 2, 3)},
    }
    assert live.sizes(going.recording_id) == {"customer": SECOND, "employee": SECOND}
    assert live.sizes(done.recording_id) == {"customer": SECOND, "employee": SECOND}
    # the refused appends' blobs are gone too
    held = [k for k in list(storage.blobs.keys()) if k.startswith(f"live-{done.recording_id}")]
    assert len(held) == 1


def test_a_finish_appends_its_tail_first_and_keeps_it_when_bytes_are_missing(
    tmp_path: Path,
) -> None:
    with (
        InProcessStore(store_config(tmp_path)) as store,
        grpc.insecure_channel(store.address) as channel,
    ):
        stub = LiveStub(channel)
        manifest = live_manifest(tmp_path)
        customer, employee = tone(3, 440), tone(3, 660)
        append(
            stub, manifest, ("customer", 0, customer[:SECOND]), ("employee", 0, employee[:SECOND])
        )
        final = finish_request(manifest, customer, employee)
        # The tail reaches 2 s of 3: refused as incomplete, but what came is kept.
        final.tail.extend(
            pb.LegBytes(leg=leg, offset=SECOND, data=data[SECOND : 2 * SECOND])
            for leg, data in (("customer", customer), ("employee", employee))
        )
        with pytest.raises(grpc.RpcError) as short:
            stub.Finish(final, timeout=30)
        assert short.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        state = stub.Query(pb.LiveQueryRequest(recording_id=manifest.recording_id), timeout=10)
        assert {s.leg: s.size for s in state.legs} == {
            "customer": 2 * SECOND,
            "employee": 2 * SECOND,
        }
        del final.tail[:]
        final.tail.extend(
            pb.LegBytes(leg=leg, offset=SECOND, data=data[SECOND:])  # overlaps: skipped
            for leg, data in (("customer", customer), ("employee", employee))
        )
        assert stub.Finish(final, timeout=30).finished
        assert finish(stub, manifest, customer, employee).finished  # the same finish again


def finish_request(manifest: pb.Manifest, customer: bytes, employee: bytes) -> pb.LiveFinishRequest:
    final = pb.Manifest()
    final.CopyFrom(manifest)
    final.ended_at.FromDatetime(manifest.started_at.ToDatetime(dt.UTC) + dt.timedelta(seconds=6))
    legs = [
        pb.LegFinal(leg=leg, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        for leg, data in (("customer", customer), ("employee", employee))
    ]
    return pb.LiveFinishRequest(manifest=final, legs=legs)


def test_archiving_threads_yield_the_cpu_to_appends_and_finishes() -> None:
    from agent.store.live.archiver import ARCHIVE_NICE, lower_priority

    def nice() -> int:
        stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])  # field 19

    base = nice()
    found: list[int] = []

    def archiving() -> None:
        lower_priority()
        found.append(nice())

    thread = threading.Thread(target=archiving)
    thread.start()
    thread.join(10)
    assert found == [max(base, ARCHIVE_NICE)]
    assert nice() == base  # only the archiving thread
