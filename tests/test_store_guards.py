"""Holes an operator could open by accident, closed in the real store: a second store on
the same port or data directory, a shared catalog with each store's own blob files,
plain text for people off loopback, an audit chain
head that can be rewritten, a head hash nobody outside holds, audit times going back,
a duplicate upload race that logs two stores, tokens that never expire, agent
certificates that can't be revoked, console exports without a purpose."""

# Fixtures are imported from tests.support.services; test arguments name them.

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from agent import certs, logs
from agent.cli import access as access_cli
from agent.config import ConfigError, store_config_from_dict
from agent.directory import Directory, DirectoryError
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.access import tokens
from agent.store.archive.vault import open_storage
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, now_ms
from agent.store.console_gate import peer_of
from agent.store.retention.sweeper import Sweeper
from tests.support.access_world import PEOPLE, World, running_world
from tests.support.faults import ingest_stub, manifest_for
from tests.support.pki import Pki, make_pki
from tests.support.services import (
    free_tcp_port,
    make_row,
    postgres,  # noqa: F401 (fixture)
    write_store_toml,
)
from tests.support.stack import InProcessStore, make_keys
from tests.test_audit_chain import catalog  # noqa: F401 (fixture)
from tests.test_ingest_limits import upload, wait_until


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def store_doc(
    root: Path, port: int, data: str = "store-data", **extra: object
) -> dict[str, object]:
    return {"listen": f"127.0.0.1:{port}", "data_dir": str(root / data),
            "tls": {"insecure": True}, **extra}  # fmt: skip


# ---------------------------------------------------------------- one store per port, per dir


def test_a_second_store_on_the_same_port_fails_with_one_line(tmp_path: Path) -> None:
    port = free_tcp_port()
    first = store_doc(tmp_path, port)
    with InProcessStore(store_config_from_dict({"store": first}, tmp_path)):
        second = write_store_toml(tmp_path / "second.toml", store_doc(tmp_path, port, "other"))
        result = cli("store", "--config", str(second))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot bind" in lines[0] and str(port) in lines[0]
    # The store's socket lacks SO_REUSEPORT: not even a socket that asks for it binds.
    with InProcessStore(store_config_from_dict({"store": first}, tmp_path)):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with probe, pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))


def test_a_second_store_on_the_same_data_dir_fails_with_one_line(tmp_path: Path) -> None:
    first = store_doc(tmp_path, 0)
    with InProcessStore(store_config_from_dict({"store": first}, tmp_path)):
        second = write_store_toml(tmp_path / "second.toml", store_doc(tmp_path, free_tcp_port()))
        result = cli("store", "--config", str(second))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "in use by another store process" in lines[0] and f"pid {os.getpid()}" in lines[0]
    with InProcessStore(store_config_from_dict({"store": first}, tmp_path)):
        pass  # the lock went with the first store


def test_people_in_plain_text_only_on_loopback(tmp_path: Path) -> None:
    doc = store_doc(tmp_path, 0, access_listen="0.0.0.0:50052")
    with pytest.raises(ConfigError, match="access_listen"):
        store_config_from_dict({"store": doc}, tmp_path)
    result = cli("check", "--store", str(write_store_toml(tmp_path / "s.toml", doc)))
    assert result.returncode != 0 and "access_listen" in result.stderr
    loopback = store_doc(tmp_path, 0, access_listen="127.0.0.1:50052")
    store_config_from_dict({"store": loopback}, tmp_path)


def test_a_shared_catalog_with_each_stores_own_files_is_refused(tmp_path: Path) -> None:
    """PostgreSQL is every replica's catalog; data_dir/blobs is one replica's: B could
    not play A's recordings and would audit as destroyed a file it cannot see."""
    pg_url = "postgresql+psycopg://callrec@127.0.0.1:5432/callrec"  # not connected to
    doc = store_doc(tmp_path, 0, catalog=pg_url)
    with pytest.raises(ConfigError, match=r"\[store\] blobs = \"files\": expected \"s3\""):
        store_config_from_dict({"store": doc}, tmp_path)
    for command in ("check", "store"):
        flag = "--store" if command == "check" else "--config"
        result = cli(command, flag, str(write_store_toml(tmp_path / "s.toml", doc)))
        assert result.returncode != 0 and "shared_blobs_dir" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    mounted = tmp_path / "mnt" / "blobs"
    config = store_config_from_dict({"store": {**doc, "shared_blobs_dir": str(mounted)}}, tmp_path)
    assert config.blobs_dir == mounted
    sqlite = store_config_from_dict({"store": store_doc(tmp_path, 0)}, tmp_path)
    assert sqlite.blobs_dir == tmp_path / "store-data" / "blobs", "one store: its own files"
    s3 = {"bucket": "b", "region": "eu-north-1", "endpoint": "http://127.0.0.1:1"}
    on_s3 = {**doc, "blobs": "s3", "s3": s3, "shared_blobs_dir": str(mounted)}
    with pytest.raises(ConfigError, match="shared_blobs_dir"):
        store_config_from_dict({"store": on_s3}, tmp_path)


# ---------------------------------------------------------------- the audit chain's head
# (``catalog``: the fixture of tests/test_audit_chain.py, on SQLite and PostgreSQL)


def test_the_database_refuses_to_move_or_delete_the_head(catalog: Catalog) -> None:  # noqa: F811 (fixture)
    with catalog.engine.begin() as conn:
        for n in range(3):
            audit.append(conn, f"person:p{n}", "search", None, "", "allowed")
    for statement in (
        "UPDATE audit_head SET seq = 0",
        "UPDATE audit_head SET seq = seq + 1",
        f"UPDATE audit_head SET last_hash = '{'0' * 64}'",
        "DELETE FROM audit_head",
    ):
        with pytest.raises(sa.exc.DBAPIError, match="audit_head"), catalog.engine.begin() as c:
            c.exec_driver_sql(statement)
    with catalog.engine.begin() as conn:  # appends still work
        audit.append(conn, "person:p9", "search", None, "", "allowed")
    verdict = audit.verify(catalog)
    assert verdict.ok and verdict.entries == 4


def test_audit_times_never_go_back_along_the_chain(catalog: Catalog) -> None:  # noqa: F811 (fixture)
    ahead = now_ms() + 600_000  # another host's clock runs 10 minutes ahead
    with catalog.engine.begin() as conn:
        audit.append(conn, "system:sweeper@b", "destroy", None, "", "destroyed", at_ms=ahead)

    def writer(n: int) -> None:
        for i in range(10):
            with catalog.engine.begin() as conn:
                audit.append(conn, f"system:sweeper@{n}", "destroy", None, "", "destroyed",
                             detail=f"n={i}")  # fmt: skip

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with catalog.engine.connect() as conn:
        times = [r.at_ms for r in conn.execute(sa.select(audit.audit_events).order_by("seq"))]
    assert len(times) == 31 and times == sorted(times) and times[0] == ahead
    assert audit.verify(catalog).ok


def test_each_sweep_logs_the_audit_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = store_config_from_dict({"store": store_doc(tmp_path, 0)}, tmp_path)
    storage = open_storage(config)
    try:
        rid = secrets.token_hex(16)
        source = tmp_path / "audio"
        source.write_bytes(os.urandom(1000))
        blob_key = storage.vault.store(rid, source, tmp_path)
        assert storage.catalog.insert(make_row(rid, blob_key, now_ms() - 400 * 86_400_000))
        Sweeper.from_config(config, storage.catalog, storage.vault).run_once()
        verdict = audit.verify(storage.catalog)
    finally:
        storage.catalog.close()
    assert verdict.ok and verdict.entries == 1
    heads = [r for r in caplog.records if getattr(r, logs.EVENT_ATTR, "") == "audit_head"]
    fields = getattr(heads[-1], logs.FIELDS_ATTR) if heads else None
    assert fields == {"seq": 1, "hash": verdict.head_hash}


# ---------------------------------------------------------------- a duplicate race


def test_the_losing_side_of_a_duplicate_race_does_not_log_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two stores on one catalog (replicas): the same recording is finished on B while
    A still waits for its finish; A then loses the insert and says so."""
    caplog.set_level(logging.INFO)
    pki = make_pki(tmp_path / "pki")
    shared = {"catalog": f"sqlite:///{tmp_path / 'shared.sqlite3'}",
              "keys": {"master_key_file": str(tmp_path / "master.key")}}  # fmt: skip
    docs = [{**store_doc(tmp_path, 0, f"data-{n}", **shared), "tls": pki.store_tls} for n in "ab"]
    a_cfg, b_cfg = (store_config_from_dict({"store": d}, tmp_path) for d in docs)
    data = os.urandom(50_000)
    manifest = manifest_for(data, "hel-1")
    with InProcessStore(a_cfg) as a, InProcessStore(b_cfg) as b:
        release = threading.Event()

        def slow_requests() -> Iterator[pb.UploadRequest]:
            yield pb.UploadRequest(manifest=manifest)
            yield pb.UploadRequest(chunk=pb.Chunk(offset=0, data=data))
            release.wait(30)
            yield pb.UploadRequest(finish=pb.Finish(size=len(data), sha256=manifest.sha256))

        on_a = ingest_stub(a, pki).Upload.future(slow_requests(), timeout=60)
        wait_until((a_cfg.incoming_dir / f"{manifest.recording_id}.part").exists)
        requests = [pb.UploadRequest(manifest=manifest),
                    pb.UploadRequest(chunk=pb.Chunk(offset=0, data=data)),
                    pb.UploadRequest(finish=pb.Finish(size=len(data),
                                                      sha256=manifest.sha256))]  # fmt: skip
        on_b = ingest_stub(b, pki).Upload(iter(requests), timeout=30)
        release.set()
        receipt_a = on_a.result(timeout=30)
    assert receipt_a.sha256 == on_b.sha256 == hashlib.sha256(data).hexdigest()
    assert receipt_a.stored_at == on_b.stored_at
    events = [getattr(r, logs.EVENT_ATTR, "") for r in caplog.records]
    stored, lost = events.count("recording_stored"), events.count("upload_duplicate")
    assert stored == 1 and lost == 1
    assert list(a_cfg.incoming_dir.iterdir()) == []


# ---------------------------------------------------------------- tokens


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield from running_world(tmp_path, make_keys(tmp_path / "keys"))


def _cli_in_process(*argv: str) -> int | None:
    parser = argparse.ArgumentParser(prog="callrec")
    sub = parser.add_subparsers(dest="command", required=True)
    access_cli.add_parsers(sub)
    return access_cli.dispatch(parser.parse_args(list(argv)))


def test_tokens_expire_and_the_list_shows_last_use(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_store_toml(tmp_path / "store.toml", world.doc["store"])
    search = apb.SearchRequest(purpose=apb.PURPOSE_TRAINING)
    world.access.Search(search, metadata=world.md("s1"), timeout=10)
    capsys.readouterr()
    assert (
        _cli_in_process("access", "token", "list", "--config", str(config), "--person", "s1") == 0
    )
    listed = capsys.readouterr().out.splitlines()
    token_id = tokens.token_id_of(world.tokens["s1"])
    [line] = [row for row in listed if row.startswith(str(token_id))]
    assert line.endswith("live") and "never" not in line  # expires and was used

    with world.storage.catalog.engine.begin() as conn:
        conn.execute(
            sa.update(tokens.access_tokens)
            .where(tokens.access_tokens.c.token_id == token_id)
            .values(expires_at_ms=now_ms() - 1)
        )
    with pytest.raises(grpc.RpcError) as err:
        world.access.Search(search, metadata=world.md("s1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.value.details() or "")

    args = ["access", "token", "create", "--config", str(config), "--person", "s1"]
    assert _cli_in_process(*args, "--expires", "401d") == 2
    assert _cli_in_process(*args, "--expires", "2w") == 0
    with world.storage.catalog.engine.connect() as conn:
        [newest, *_] = tokens.list_tokens(conn, "s1")
    assert newest.expires_at_ms - newest.created_at_ms == 14 * tokens.DAY_MS


# ---------------------------------------------------------------- agent certificates


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = make_pki(tmp_path / "pki")
    pki.add_agent("tku-2")
    return pki


def test_a_revoked_certificate_or_site_is_refused_at_ingest(tmp_path: Path, pki: Pki) -> None:
    doc = {**store_doc(tmp_path, 0), "tls": pki.store_tls}
    config = write_store_toml(tmp_path / "store.toml", doc)
    serial = certs.serial_of(certs.load_cert(pki.directory / "agent-hel-1.pem"))
    with InProcessStore(store_config_from_dict({"store": doc}, tmp_path)) as store:
        upload(ingest_stub(store, pki), os.urandom(3000), "hel-1")
        cert = str(pki.directory / "agent-hel-1.pem")
        result = cli("certs", "revoke", "--config", str(config), "--cert", cert,
                     "--reason", "laptop stolen")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert serial in cli("certs", "revoked", "--config", str(config)).stdout
        listed = json.loads(cli("certs", "revoked", "--config", str(config), "--json").stdout)
        assert [(r["kind"], r["value"], r["reason"]) for r in listed] == [
            ("serial", serial, "laptop stolen")
        ]
        wait_until(lambda: _refused(store, pki), timeout=15)
        # another site goes on
        upload(ingest_stub(store, pki, "agent-tku-2"), os.urandom(3000), "tku-2")
        assert cli("certs", "revoke", "--config", str(config), "--site", "tku-2",
                   "--reason", "office closed").returncode == 0  # fmt: skip
        wait_until(lambda: _refused(store, pki, "tku-2"), timeout=15)
        assert cli("certs", "unrevoke", "--config", str(config), "--serial", serial).returncode == 0
        wait_until(lambda: not _refused(store, pki), timeout=15)
    storage = open_storage(store.config)
    try:
        with storage.catalog.engine.connect() as conn:
            actions = [r.action for r in conn.execute(sa.select(audit.audit_events))]
    finally:
        storage.catalog.close()
    assert actions.count("cert_revoke") == 2 and actions.count("cert_unrevoke") == 1


def _refused(store: InProcessStore, pki: Pki, site: str = "hel-1") -> bool:
    try:
        upload(ingest_stub(store, pki, f"agent-{site}"), os.urandom(3000), site)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "revoked" in (err.details() or "")
        return True
    return False


# ---------------------------------------------------------------- console, directory


def test_console_export_needs_a_purpose_and_names_the_operator(world: World) -> None:
    rid = world.seed([("a1", "Aino Agent", "parcels")])
    for name in ("console.sock", "console.inner.sock"):  # the store's user and root only
        assert (world.config.data_dir / name).stat().st_mode & 0o077 == 0
    console = pb_grpc.ConsoleStub(
        grpc.insecure_channel(f"unix:{world.store.server.console_socket}")
    )
    request = pb.ExportAudioRequest(recording_id=rid, reason="quality check")
    with pytest.raises(grpc.RpcError) as err:
        b"".join(c.data for c in console.ExportAudio(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request.purpose = "verification"
    before = world.head_seq()
    assert b"".join(c.data for c in console.ExportAudio(request, timeout=10))
    [event] = world.events_after(before)
    # The kernel's account of this process (SO_PEERCRED through the console's relay).
    me = peer_of(f"unix-abstract:callrec-console-uid{os.getuid()}-pid{os.getpid()}-00")
    assert me is not None
    assert event["actor"].startswith(f"console:{me.login}@") and event["purpose"] == "verification"
    assert f"uid={os.getuid()}" in event["detail"] and f"pid={os.getpid()}" in event["detail"]

    untrained = f'\n[[person]]\nid = "{me.login}"\nname = "Operator"\nrole = "admin"\n'
    world.rewrite_directory(PEOPLE + untrained)  # this login is a person without training
    with pytest.raises(grpc.RpcError) as err:
        b"".join(c.data for c in console.ExportAudio(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert world.events_after(before)[-1]["outcome"] == "denied"


def test_the_directory_refuses_the_id_unknown() -> None:
    person = {"name": "X", "role": "agent", "trained": None}
    for bad in ("unknown", "Unknown", "a b", "x" * 65, "e1;drop"):
        entry = {k: v for k, v in {**person, "id": bad}.items() if v is not None}
        with pytest.raises(DirectoryError, match="id"):
            Directory.from_dict({"person": [entry]})
    Directory.from_dict({"person": [{"id": "e1001", "name": "X", "role": "agent"}]})
