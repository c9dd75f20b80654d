"""Store-and-forward under faults, with the real daemons (`callrec store`, `callrec
agent`) over mutual TLS: the store down, the store or the agent SIGKILLed mid-upload,
the connection cut, a byte corrupted in flight, and uploads the store must refuse.

Each end-to-end test ends with the same check: the store holds exactly the recordings
made (by id and the agent's sha256), none twice, nothing is left in the outbox, in
quarantine or in the store's incoming/. Recordings are synthetic captures dropped into
captures/ready/ as a SIP worker leaves them (the SIP side is tested elsewhere).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import REGISTRY

from agent import certs
from agent.capture import new_recording_id
from agent.config import ConfigError, UplinkConfig, agent_config_from_dict, store_config_from_dict
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.uplink import client as uplink
from agent.recorder.uplink.backpressure import OutboxMonitor
from agent.recorder.uplink.outbox import Outbox
from agent.store import server
from agent.store.catalog import Catalog
from agent.testcall.sipp import free_port
from tests.support.daemons import Daemon, start_agent, start_store
from tests.support.faults import (
    BYTES_PER_AUDIO_S,
    agent_sections,
    assert_exactly,
    ingest_stub,
    kill_agent,
    manifest_for,
    outbox_shas,
    tcp_port,
    uploaded,
    wait_part,
    wait_stored,
    write_capture,
)
from tests.support.pki import SITE, Pki, make_pki
from tests.support.proxy import TcpProxy
from tests.support.stack import InProcessStore, Keys, agent_config, store_config


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@dataclass
class Stack:
    """The daemons of one test, stopped at teardown whatever happened."""

    root: Path
    keys: Keys
    pki: Pki
    started: list[Daemon] = field(default_factory=list)

    def store(self, port: int = 0, tls: bool = True) -> tuple[Daemon, int]:
        daemon, address = start_store(self.root, port, tls=self.pki.store_tls if tls else None)
        self.started.append(daemon)
        return daemon, int(address.rpartition(":")[2])

    def agent(self, port: int, sip_port: int = 0, tls: bool = True, **uplink: object) -> Daemon:
        sections = agent_sections(self.pki if tls else None, **uplink)
        address = f"127.0.0.1:{port}"
        daemon = start_agent(self.root, self.keys, address, sip_port or free_port(), **sections)
        self.started.append(daemon)
        return daemon

    def capture(self, seconds: int) -> str:
        return write_capture(self.root / "agent-data", self.keys, seconds)

    def shas(self, ids: set[str]) -> dict[str, str]:
        return outbox_shas(self.root / "agent-data", ids)


@pytest.fixture
def stack(tmp_path: Path, keys: Keys, pki: Pki) -> Iterator[Stack]:
    stack = Stack(tmp_path, keys, pki)
    try:
        yield stack
    finally:
        for daemon in reversed(stack.started):
            daemon.stop(timeout=30)


def retried_with(agent: Daemon, rid: str, code: str) -> bool:
    """An attempt of ``rid`` failed with ``code``: a per-entry retry line, or the line
    telling that the store became unreachable (store-level codes are told once)."""
    text = agent.text()
    if re.search(rf"event=upload_retry recording_id={rid} code={code}", text):
        return True
    return bool(re.search(rf"event=store_unreachable code={code} .*recording_id={rid}", text))


# ---------------------------------------------------------------- end-to-end faults


@pytest.mark.slow
def test_store_down_while_50_recordings_are_made(stack: Stack) -> None:
    port = tcp_port()
    agent = stack.agent(port, outbox_warn_bytes="200 KB", outbox_check="1s")
    made = stack.shas({stack.capture(seconds=1 + i % 2) for i in range(50)})
    agent.wait_for(r"level=warning event=store_unreachable code=UNAVAILABLE")
    agent.wait_for(r"level=warning .*event=outbox_backpressure entries=50 .*over=bytes")
    store, _ = stack.store(port)
    wait_stored(stack.root, 50, timeout=120)
    # Cleared once the outbox is back under its limits (200 KB here): a few entries may
    # still be on their way up when the line is written.
    agent.wait_for(r"event=outbox_backpressure_cleared entries=\d+ bytes=\d+", timeout=10)
    assert_exactly(stack.root, made)
    assert agent.text().count("event=recording_uploaded") == 50
    assert store.text().count("site_verified=certificate") == 50


@pytest.mark.slow
def test_store_outage_is_told_once_with_summaries_not_per_attempt(stack: Stack) -> None:
    """Issue 17: one line when the store goes away, a summary at most every
    ``store_down_summary`` while it is away, one line when it is back; no warning per
    attempt and entry."""
    port = tcp_port()
    store, _ = stack.store(port)
    agent = stack.agent(port, backoff_max="1s", store_down_summary="3s")
    first = stack.capture(seconds=1)
    wait_stored(stack.root, 1, timeout=30)
    store.stop()
    made = stack.shas({stack.capture(seconds=1) for _ in range(3)})
    catalog = Catalog(f"sqlite:///{stack.root / 'store-data' / 'catalog.sqlite3'}")
    made[first] = catalog.list()[0].sha256
    catalog.close()
    agent.wait_for(r"event=store_unreachable code=UNAVAILABLE .*entries_waiting=\d")
    agent.wait_for(r"event=store_still_unreachable for_s=\d+ .*entries_waiting=3", timeout=15)
    time.sleep(4)  # attempts go on (backoff capped at 1 s): no more lines than summaries
    stack.store(port)
    wait_stored(stack.root, 4, timeout=60)
    text = agent.text()
    assert text.count("event=store_unreachable") == 1
    back = re.findall(
        r"event=store_reachable down_s=([\d.]+) attempts=(\d+) entries_waited=3", text
    )
    assert len(back) == 1 and int(back[0][1]) >= 5, text[-3000:]
    summaries = text.count("event=store_still_unreachable")
    assert 1 <= summaries <= float(back[0][0]) / 3 + 1, (summaries, back)
    assert "event=upload_retry" not in text, "no line per attempt while the store is down"
    assert_exactly(stack.root, made)


LARGE_S = 900  # 15 minutes of stereo WAV: 28.8 MB


@pytest.mark.slow
def test_store_sigkilled_mid_upload_resumes(stack: Stack) -> None:
    store, store_port = stack.store()
    with TcpProxy(store_port, rate_bytes_s=8e6) as proxy:
        agent = stack.agent(proxy.port)
        rid = stack.capture(seconds=LARGE_S)
        made = stack.shas({rid})
        killed_at = wait_part(stack.root, rid, LARGE_S * BYTES_PER_AUDIO_S // 3)
        store.stop(signal.SIGKILL)
        stack.store(store_port)
        wait_stored(stack.root, 1, timeout=90)
    up = uploaded(agent, rid)
    assert up["resumed"] >= killed_at > 0, "resumed from the store's durable bytes"
    assert up["sent"] == up["bytes"] - up["resumed"]
    # Sent twice: only what was in flight (buffers) when the store died.
    assert up["total"] - up["bytes"] < 0.25 * up["bytes"], "re-sent far fewer than the file"
    assert retried_with(agent, rid, "UNAVAILABLE")
    assert_exactly(stack.root, made)


@pytest.mark.slow
def test_agent_sigkilled_mid_upload_resumes_after_restart(stack: Stack) -> None:
    _, store_port = stack.store()
    sip_port = free_port()
    with TcpProxy(store_port, rate_bytes_s=8e6) as proxy:
        agent = stack.agent(proxy.port, sip_port)
        rid = stack.capture(seconds=LARGE_S)
        made = stack.shas({rid})
        killed_at = wait_part(stack.root, rid, LARGE_S * BYTES_PER_AUDIO_S // 3)
        kill_agent(agent)
        agent = stack.agent(proxy.port, sip_port)
        wait_stored(stack.root, 1, timeout=90)
    up = uploaded(agent, rid)  # counted by the restarted agent
    assert up["resumed"] >= killed_at > 0, "resumed from the store's durable bytes"
    assert up["sent"] == up["bytes"] - up["resumed"] < 0.7 * up["bytes"]
    assert_exactly(stack.root, made)


def test_connection_cut_mid_stream_resumes(stack: Stack) -> None:
    _, store_port = stack.store()
    with TcpProxy(store_port, rate_bytes_s=4e6) as proxy:
        proxy.cut_after(3_000_000)
        agent = stack.agent(proxy.port)
        rid = stack.capture(seconds=120)  # 3.84 MB
        made = stack.shas({rid})
        wait_stored(stack.root, 1, timeout=60)
    assert proxy.cuts == 1
    up = uploaded(agent, rid)
    assert up["resumed"] > 0 and up["attempts"] == 2
    assert retried_with(agent, rid, "UNAVAILABLE")
    assert_exactly(stack.root, made)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_byte_corrupted_in_flight_is_caught_and_resent(stack: Stack, tls: bool) -> None:
    store, store_port = stack.store(tls=tls)
    with TcpProxy(store_port, rate_bytes_s=20e6) as proxy:
        agent = stack.agent(proxy.port, tls=tls)
        if tls:
            proxy.flip_raw_at(1_000_000)  # lands in a TLS record: the record fails
        else:
            proxy.flip_in_grpc_message()  # lands in a chunk's audio bytes
        rid = stack.capture(seconds=60)
        made = stack.shas({rid})
        wait_stored(stack.root, 1, timeout=60)
    assert proxy.flips == 1
    if tls:
        assert retried_with(agent, rid, "UNAVAILABLE")
    else:
        assert re.search(rf"event=upload_refused recording_id={rid} code=DATA_LOSS", store.text())
        assert retried_with(agent, rid, "DATA_LOSS")
        assert uploaded(agent, rid)["resumed"] == 0, "discarded bytes are sent again in full"
    assert_exactly(stack.root, made)


# ---------------------------------------------------------------- refusals


@pytest.fixture
def tls_store(tmp_path: Path, pki: Pki) -> Iterator[InProcessStore]:
    with InProcessStore(store_config(tmp_path, tls=pki.store_tls)) as running:
        yield running


def _upload(
    stub: pb_grpc.IngestStub, manifest: pb.Manifest, chunks: list[pb.Chunk]
) -> pb.UploadReceipt:
    requests = [pb.UploadRequest(manifest=manifest)]
    requests += [pb.UploadRequest(chunk=c) for c in chunks]
    requests.append(pb.UploadRequest(finish=pb.Finish(size=manifest.size, sha256=manifest.sha256)))
    receipt: pb.UploadReceipt = stub.Upload(iter(requests), timeout=10)
    return receipt


def _refused(store: InProcessStore, call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    assert list(store.config.incoming_dir.iterdir()) == [], "nothing left behind"
    return err.value


def test_the_right_certificate_uploads(tls_store: InProcessStore, pki: Pki) -> None:
    data = os.urandom(300_000)
    manifest = manifest_for(data)
    chunks = [pb.Chunk(offset=o, data=data[o : o + 65536]) for o in range(0, len(data), 65536)]
    receipt = _upload(ingest_stub(tls_store, pki), manifest, chunks)
    assert receipt.sha256 == manifest.sha256
    row = Catalog(tls_store.config.catalog_url).get(manifest.recording_id)
    assert row is not None and row.site == SITE
    assert list(tls_store.config.incoming_dir.iterdir()) == []


def _foreign_and_siteless(pki: Pki) -> None:
    other = certs.new_ca()
    certs.write_pair(pki.directory, "foreign", certs.issue_agent(other, SITE))
    siteless = certs._leaf(
        pki.ca,
        x509.Name.from_rfc4514_string("CN=hel-1,O=callrec"),
        [x509.DNSName("hel-1.example")],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        30,
    )
    certs.write_pair(pki.directory, "siteless", siteless)


@pytest.mark.parametrize(
    ("stem", "code", "message"),
    [
        ("foreign", grpc.StatusCode.UNAVAILABLE, ""),  # another CA: the handshake fails
        ("store", grpc.StatusCode.UNAVAILABLE, ""),  # a server certificate as a client
        ("siteless", grpc.StatusCode.PERMISSION_DENIED, "names no site"),
        (None, grpc.StatusCode.UNAVAILABLE, ""),  # no client certificate at all
    ],
)
def test_bad_certificate_is_refused(
    tls_store: InProcessStore, pki: Pki, stem: str | None, code: grpc.StatusCode, message: str
) -> None:
    _foreign_and_siteless(pki)
    data = os.urandom(1000)
    if stem is None:
        creds = grpc.ssl_channel_credentials((pki.directory / "ca.pem").read_bytes())
        stub = pb_grpc.IngestStub(grpc.secure_channel(tls_store.address, creds))
    else:
        stub = ingest_stub(tls_store, pki, stem)
    error = _refused(tls_store, lambda: _upload(stub, manifest_for(data), [pb.Chunk(data=data)]))
    assert error.code() == code
    assert message in (error.details() or "")


def test_plain_text_client_is_refused(tls_store: InProcessStore) -> None:
    stub = pb_grpc.IngestStub(grpc.insecure_channel(tls_store.address))
    request = pb.QueryUploadRequest(recording_id=new_recording_id())
    error = _refused(tls_store, lambda: stub.QueryUpload(request, timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_manifest_for_another_site_is_refused(tls_store: InProcessStore, pki: Pki) -> None:
    data = os.urandom(1000)
    manifest = manifest_for(data, site="tku-9")
    stub = ingest_stub(tls_store, pki)
    error = _refused(tls_store, lambda: _upload(stub, manifest, [pb.Chunk(data=data)]))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'tku-9'" in (error.details() or "") and f"'{SITE}'" in (error.details() or "")
    assert Catalog(tls_store.config.catalog_url).get(manifest.recording_id) is None


def test_wrong_offset_is_refused(tls_store: InProcessStore, pki: Pki) -> None:
    data = os.urandom(100_000)
    stub = ingest_stub(tls_store, pki)
    chunk = pb.Chunk(offset=4096, data=data[4096:])
    error = _refused(tls_store, lambda: _upload(stub, manifest_for(data), [chunk]))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "committed_size is 0" in (error.details() or "")


@pytest.mark.parametrize(
    ("size", "code", "message"),
    [
        (300 * 1024, grpc.StatusCode.INVALID_ARGUMENT, "chunk of 307200 bytes: expected 1..262144"),
        (1024 * 1024, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),  # message limit
    ],
)
def test_oversized_chunk_is_refused(
    tls_store: InProcessStore, pki: Pki, size: int, code: grpc.StatusCode, message: str
) -> None:
    data = os.urandom(size)
    stub = ingest_stub(tls_store, pki)
    error = _refused(tls_store, lambda: _upload(stub, manifest_for(data), [pb.Chunk(data=data)]))
    assert error.code() == code
    assert message in (error.details() or "")


# ---------------------------------------------------------------- start-up refusals


def test_tls_is_the_default(tmp_path: Path, keys: Keys) -> None:
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:50051")
    del doc["uplink"]["insecure"]
    cfg = agent_config_from_dict(doc, tmp_path)
    with pytest.raises(ConfigError, match=r"\[uplink\] ca_file, cert_file, key_file: missing"):
        uplink.make_channel(cfg.uplink)


def test_insecure_only_on_loopback(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"\[uplink\] insecure = true: expected false"):
        agent_config(tmp_path, keys, "10.1.2.3:50051")
    doc = {"store": {"listen": "0.0.0.0:50051", "data_dir": "d", "tls": {"insecure": True}}}
    with pytest.raises(ConfigError, match=r"\[store.tls\] insecure = true: expected false"):
        store_config_from_dict(doc, tmp_path)


def test_agent_refuses_a_certificate_for_another_site(tmp_path: Path, keys: Keys, pki: Pki) -> None:
    pki.add_agent("tku-1")
    up = {"insecure": False, **pki.files("agent-tku-1")}
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:50051", uplink=up)
    with pytest.raises(ConfigError, match="certificate is for site 'tku-1'"):
        uplink.make_channel(cfg.uplink, site=SITE)


def test_keepalive_settings_agree() -> None:
    client = dict(uplink.CHANNEL_OPTIONS)
    served = dict(server.SERVER_OPTIONS)
    assert (
        client["grpc.keepalive_time_ms"] >= served["grpc.http2.min_ping_interval_without_data_ms"]
    )
    assert client["grpc.max_send_message_length"] <= served["grpc.max_receive_message_length"]
    assert UplinkConfig().chunk_bytes + 1024 <= served["grpc.max_receive_message_length"]


# ---------------------------------------------------------------- backpressure, certs command


def test_backpressure_warns_and_sets_gauges(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(tmp_path / "outbox")
    entry = outbox.root / new_recording_id()
    entry.mkdir()
    (entry / "audio.wav").write_bytes(b"x" * 5000)
    monitor = OutboxMonitor(outbox, warn_bytes=1000, warn_age_s=3600, interval_s=60)
    with caplog.at_level(logging.INFO):
        level = monitor.check()
        assert level.over == ("bytes",)
        assert REGISTRY.get_sample_value("callrec_outbox_entries") == 1
        assert REGISTRY.get_sample_value("callrec_outbox_bytes") == 5000
        assert REGISTRY.get_sample_value("callrec_outbox_over_limit") == 1
        (entry / "audio.wav").unlink()
        entry.rmdir()
        assert monitor.check().over == ()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("event=outbox_backpressure entries=1 bytes=5000") for m in messages)
    assert any(m.startswith("event=outbox_backpressure_cleared entries=0") for m in messages)
    assert REGISTRY.get_sample_value("callrec_outbox_over_limit") == 0


def test_certs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="callrec")
    certs.add_parsers(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> int | None:
        return certs.dispatch(parser.parse_args(list(argv)))

    d = tmp_path / "pki"
    assert run("certs", "ca", str(d)) == 0
    assert run("certs", "store", str(d), "--host", "store.example", "--host", "10.0.0.5") == 0
    assert run("certs", "agent", str(d), "--site", "hel-1") == 0
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (d / "agent-hel-1.key").stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    assert run("certs", "show", str(d / "agent-hel-1.pem")) == 0
    shown = capsys.readouterr().out
    assert "site      hel-1" in shown and "callrec:site:hel-1" in shown
    assert run("certs", "show", str(d / "store.pem")) == 0
    assert "store.example" in capsys.readouterr().out
    assert run("certs", "agent", str(d), "--site", "hel-1") == 2, "never overwrites"
    assert "exists" in capsys.readouterr().err
    assert run("certs", "agent", str(d), "--site", "Bad Site") == 2


def test_store_reachability_lines_per_change_and_per_summary_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from agent.recorder.uplink.reachability import StoreReachability

    now = [1000.0]
    outbox = [3]
    watch = StoreReachability(lambda: outbox[0], summary_every_s=300, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="agent.recorder.uplink.client")
    watch.answered()  # up and answering: nothing to say
    for _ in range(201):  # ten minutes of attempts every 3 s, 3 entries waiting, then 5
        watch.failed("a" * 32, grpc.StatusCode.UNAVAILABLE, "connection refused")
        now[0] += 3
        outbox[0] = 5 if now[0] > 1300 else 3
    watch.answered()
    watch.answered()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[0] for line in lines] == [
        "event=store_unreachable",
        "event=store_still_unreachable",
        "event=store_still_unreachable",
        "event=store_reachable",
    ]
    assert "entries_waiting=3" in lines[0] and "recording_id=" + "a" * 32 in lines[0]
    assert "for_s=300 code=UNAVAILABLE" in lines[1] and "attempts=101" in lines[1]
    assert lines[3] == "event=store_reachable down_s=603.0 attempts=201 entries_waited=5"
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING", "WARNING", "INFO"]


def test_a_refused_certificate_is_an_error_line(caplog: pytest.LogCaptureFixture) -> None:
    from agent.recorder.uplink.reachability import StoreReachability

    watch = StoreReachability(lambda: 1, summary_every_s=300)
    caplog.set_level(logging.INFO, logger="agent.recorder.uplink.client")
    watch.failed("b" * 32, grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
    [record] = caplog.records
    assert record.levelname == "ERROR"
    assert record.getMessage().startswith("event=store_unreachable code=PERMISSION_DENIED")
