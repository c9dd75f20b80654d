"""One real run of store and agent with both /metrics endpoints, scraped as Prometheus
would, under mutual TLS: a store holding one recording already past retention (swept
at start) and one on legal hold, an agent with two workers recording two SIPp calls, one refused
Access request and one refused upload; then the store stops and a third call waits
in the outbox."""

from __future__ import annotations

import datetime as dt
import secrets
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from agent.config import load_store_config
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.status import STATUS_INTERVAL_S
from agent.store.archive.vault import open_storage
from agent.store.retention.schedule import datetime_to_ms
from agent.testcall import SiprecCall, free_port, make_speech, run_sipp, siprec_scenario
from tests.support.daemons import Daemon, NotifySocket, start_agent, start_store
from tests.support.pki import Pki, make_pki
from tests.support.services import free_tcp_port, make_row
from tests.support.stack import DIRECTORY_TOML, Keys, make_keys, write_toml

CALLS = 2


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@dataclass
class Run:
    root: Path
    store_port: int = 0
    agent_port: int = 0
    scrapes: dict[str, str] = field(default_factory=dict)  # name → exposition text
    scraped_at: dict[str, float] = field(default_factory=dict)  # name → Unix time
    status: list[str] = field(default_factory=list)  # the agent's STATUS= lines
    store_status: list[str] = field(default_factory=list)  # the store's
    seeded: dict[str, str] = field(default_factory=dict)  # "expired"/"held" → id


def _seed(root: Path, store_doc: dict[str, dict[str, object]], run: Run) -> None:
    """A recording that ended seven months ago, and one more on legal hold."""
    config = load_store_config(write_toml(root / "store.toml", store_doc))
    storage = open_storage(config)
    ended = datetime_to_ms(dt.datetime.now(dt.UTC) - dt.timedelta(days=213))
    try:
        for name, held in (("expired", False), ("held", True)):
            rid = secrets.token_hex(16)
            source = root / f"{rid}.part"
            source.write_bytes(rid.encode() * 64)
            blob_key = storage.vault.store(rid, source, root)
            assert storage.catalog.insert(make_row(rid, blob_key, ended, legal_hold=held))
            run.seeded[name] = rid
    finally:
        storage.catalog.close()


def _channel(address: str, pki: Pki) -> grpc.Channel:
    """The agent's own mutual-TLS identity."""
    return grpc.secure_channel(address, pki.credentials())


def _refused_access(address: str, pki: Pki) -> None:
    """A request without a token: UNAUTHENTICATED (and counted)."""
    with _channel(address, pki) as channel:
        try:
            apb_grpc.AccessStub(channel).Search(
                apb.SearchRequest(purpose=apb.PURPOSE_VERIFICATION), timeout=10
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        else:
            raise AssertionError("a request without a token was served")


def _refused_upload(address: str, pki: Pki) -> None:
    """An upload stream that ends before its manifest: INVALID_ARGUMENT (and counted)."""
    with _channel(address, pki) as channel:
        try:
            pb_grpc.IngestStub(channel).Upload(iter(()), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
        else:
            raise AssertionError("an empty upload was accepted")


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f}s"
        time.sleep(0.2)


def real_run(root: Path) -> Run:
    run = Run(root, free_tcp_port(), free_tcp_port())
    (root / "people.toml").write_text(DIRECTORY_TOML)
    pki = make_pki(root / "pki")
    store_keys = {
        "metrics": f"127.0.0.1:{run.store_port}",
        "directory_file": str(root / "people.toml"),
    }
    doc: dict[str, dict[str, object]] = {
        "store": {"listen": "127.0.0.1:0", "data_dir": str(root / "store-data"), **store_keys},
        "store.tls": pki.store_tls,
    }
    _seed(root, doc, run)
    keys = make_keys(root / "keys")
    speech = make_speech(root / "speech")
    notify = {name: NotifySocket(root / f"{name}-notify.sock") for name in ("store", "agent")}
    store, address = start_store(
        root,
        # A 2 s watchdog: the store's loop (and its STATUS=) ticks every second.
        env={"NOTIFY_SOCKET": str(notify["store"].path), "WATCHDOG_USEC": "2000000"},
        tls=pki.store_tls,
        metrics=store_keys["metrics"],
        directory_file=store_keys["directory_file"],
    )
    agent: Daemon | None = None
    try:
        store.wait_for(r"event=sweep_done destroyed=1 ")
        _refused_access(address, pki)
        _refused_upload(address, pki)
        sip_port = free_port()
        agent = _start_agent(run, keys, pki, address, sip_port, notify["agent"])
        spec = SiprecCall(speech.customer, speech.employee, call_ms=1500)
        for n in range(CALLS):
            assert run_sipp(siprec_scenario(spec), ("127.0.0.1", sip_port), root / f"pbx{n}").ok
        _until("uploads", lambda: agent.text().count("event=recording_uploaded") >= CALLS)
        time.sleep(1.5)  # the outbox monitor's next check
        run.scraped_at["agent"] = run.scraped_at["store"] = time.time()
        run.scrapes["agent"] = scrape(run.agent_port)
        run.scrapes["store"] = scrape(run.store_port)
        store.stop()
        assert run_sipp(siprec_scenario(spec), ("127.0.0.1", sip_port), root / "pbx-late").ok
        _until("outbox entry", lambda: "\ncallrec_outbox_entries 1.0\n" in scrape(run.agent_port))
        run.scrapes["agent_store_down"] = scrape(run.agent_port)
        time.sleep(STATUS_INTERVAL_S + 0.5)
    finally:
        if agent is not None:
            agent.stop()
        store.stop()
        for sock in notify.values():
            sock.close()
    run.status = [line for line in notify["agent"].states() if line.startswith("STATUS=")]
    run.store_status = [line for line in notify["store"].states() if line.startswith("STATUS=")]
    return run


def _start_agent(
    run: Run, keys: Keys, pki: Pki, address: str, sip_port: int, notify: NotifySocket
) -> Daemon:
    """Two workers behind the agent's own Kamailio, mutual TLS to the store."""
    return start_agent(
        run.root,
        keys,
        address,
        sip_port,
        agent={"metrics": f"127.0.0.1:{run.agent_port}"},
        sip={
            "front": True,
            "run_front": True,
            "workers": 2,
            "worker_port": free_port(2),
            "rtp_port_count": 40,
            "rtp_port_start": free_port(80),
            "probe_interval": "1s",
        },
        uplink={"outbox_check": "1s", **pki.agent_uplink},
        env={"NOTIFY_SOCKET": str(notify.path)},
    )


@pytest.fixture(scope="session")
def monitoring_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One real run for every test that reads its scrapes (about 45 s)."""
    return real_run(tmp_path_factory.mktemp("monitoring"))
