"""The people's web in front of store replicas (issues 16 and 18): `callrec web` (its own
process) points at a real HAProxy that balances every gRPC call (HTTP/2 mode, TLS
ended and made again to the stores) over two real `callrec store` processes on one
PostgreSQL catalog and one SeaweedFS bucket; a real OpenID provider signs people in
and a real Chromium (Playwright) is the person. A recording uploaded through one
replica is listed, opened and played through both; then a replica dies (SIGTERM,
SIGKILL, and SIGKILL with a request of the person's in flight on it) and the person
keeps working: the next page and the next play succeed, and each play is audited once."""

# Fixtures are imported from tests.support.services; test arguments name them.

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.config import load_store_config
from agent.store.archive.vault import Storage, open_storage
from agent.store.audit.chain import audit_events, audit_head
from tests.support.access_world import PEOPLE
from tests.support.pki import Pki, make_pki
from tests.support.replicas import HAPROXY, Agents, StoreReplicas
from tests.support.services import (
    Postgres,
    SeaweedFS,
    free_tcp_port,
    postgres,  # noqa: F401 (fixture)
    seaweed,  # noqa: F401 (fixture)
)
from tests.support.stack import Keys, make_keys
from tests.support.web import (
    ARTIFACTS,
    CHROMIUM,
    CLIENT_ID,
    https_get,
    launch_chromium,
    long_opus,
    node_ready,
    start_provider,
    start_web,
    stop_process,
    web_toml,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy not installed (.ci/setup)"),
    pytest.mark.skipif(
        not (CHROMIUM.exists() and node_ready()), reason="needs chromium and tests/oidc (.ci/setup)"
    ),
]
COOKIE = "__Host-callrec"
SECONDS = 30  # the call (tests.support.calls: 30 s); one Range answer (< 1 MiB) holds it
LONG = 420  # 1.26 MB of Opus: more than one answer (MAX_PART)


@dataclass
class Site:
    root: Path
    stores: StoreReplicas
    storage: Storage
    url: str
    ca: Path
    web_log: Path
    rid: str  # uploaded by an agent through replica r1
    long_rid: str  # LONG seconds: its audio answers are 1 MiB parts
    tcp_url: str  # a second web, through HAProxy's Access frontend in TCP mode

    @property
    def haproxy_log(self) -> str:
        return (self.root / "haproxy.log").read_text(errors="replace")

    def served_by(self, after: int = 0) -> list[str]:
        """The replicas HAProxy sent Access calls to (its HTTP log), in order."""
        return re.findall(r"stores_access/(r\d) .*?/callrec\.v1\.Access/", self.haproxy_log[after:])

    def wait_haproxy(self, pattern: str, after: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.haproxy_log[after:]):
            assert time.monotonic() < deadline, f"haproxy: no {pattern!r}:\n{self.haproxy_log}"
            time.sleep(0.05)

    def head_seq(self) -> int:
        with self.storage.catalog.engine.connect() as conn:
            return int(conn.execute(sa.select(audit_head.c.seq)).scalar_one())

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        query = sa.select(audit_events).where(audit_events.c.seq > seq).order_by("seq")
        with self.storage.catalog.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def plays(self, seq: int, rid: str = "") -> list[dict[str, Any]]:
        return [
            e for e in self.events_after(seq)
            if e["action"] == "play" and e["recording_id"] == (rid or self.rid)
            and e["detail"].startswith("channel=web bytes=")
        ]  # fmt: skip

    def all_up(self) -> None:
        """Start again the replicas a test before stopped, and wait until HAProxy has
        them back in rotation."""
        for r in self.stores.replicas:
            if r.daemon.process is not None and r.daemon.process.poll() is not None:
                seen = len(self.haproxy_log)
                r.start()
                self.wait_haproxy(rf"Server stores_access/{r.name} is UP", seen)


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: Postgres,  # noqa: F811 (fixture)
    seaweed: SeaweedFS,  # noqa: F811 (fixture)
) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("webha")
    pki, keys = make_pki(root / "pki"), make_keys(root / "seal")
    d = pki.directory
    tls = (d / "ca.pem", d / "store.pem", d / "store.key")  # one CA for every TLS here
    (root / "people.toml").write_text(PEOPLE)
    (root / "store-keys").mkdir()
    web_port, tcp_web_port = free_tcp_port(), free_tcp_port()
    with ExitStack() as stack:
        provider, issuer, _ = start_provider(root, tls, (web_port, tcp_web_port))
        stack.callback(stop_process, provider)
        shared = {
            "catalog": postgres.new_database(),
            "blobs": "s3",
            "s3": seaweed.s3_section(seaweed.new_bucket()),
            "keys": {"master_key_file": str(root / "store-keys" / "master.key")},
            "tls": pki.store_tls,
            "directory_file": str(root / "people.toml"),
            "seal_key_file": str(keys.seal_private),
            "oidc": {"issuer": issuer, "audience": CLIENT_ID, "ca_file": str(tls[0])},
        }
        stores = StoreReplicas(root, 2, shared, access_tls=tls)
        storage = open_storage(load_store_config(stores.config_file(0)))  # migrates; the key
        stack.callback(storage.catalog.close)
        stack.callback(stores.close)
        tcp = f"127.0.0.1:{stores.balancer.access_tcp_port}"
        webs = [("web", web_port, stores.access_address), ("web-tcp", tcp_web_port, tcp)]
        running: list[subprocess.Popen[bytes]] = []
        stack.callback(lambda: [stop_process(w) for w in running])
        starting = []
        for name, port, address in webs:
            config = web_toml(root, tls, port, address, issuer, store_ca=tls[0], name=name)
            url, log = f"https://127.0.0.1:{port}", root / f"{name}.log"
            starting.append(_start_web_in_thread(config, url, tls[0], log, running))
            stack.callback(starting[-1].join, 60)
        stores.start(together=True)
        rid, long_rid = _upload(root, keys, pki, stores.replicas[1].address)
        for thread in starting:
            thread.join(60)
        assert len(running) == len(webs), "callrec web did not start (see web*.log)"
        url, tcp_url = (f"https://127.0.0.1:{port}" for _, port, _ in webs)
        yield Site(root, stores, storage, url, tls[0], root / "web.log", rid, long_rid, tcp_url)


def _start_web_in_thread(
    config: Path, url: str, ca: Path, log: Path, running: list[subprocess.Popen[bytes]]
) -> threading.Thread:
    return _in_thread(lambda: running.append(start_web(config, url, ca, log)))


def _upload(root: Path, keys: Keys, pki: Pki, address: str) -> tuple[str, str]:
    """Two recordings from an agent (the real Uplink) straight to one replica."""
    agents = Agents(root / "agent", keys, pki, address, clients=1, workers=1)
    rids = agents.add(long_opus(SECONDS)), agents.add(long_opus(LONG))
    agents.start()
    try:
        agents.wait_empty(60)
    finally:
        agents.close()
    return rids


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_chromium()


@pytest.fixture
def supervisor(browser: Any, site: Site) -> Iterator[Any]:
    page = sign_in(browser, site.url)
    yield page
    page.context.close()


def sign_in(browser: Any, url: str) -> Any:
    """Sari Supervisor (s1, team parcels) signed in through the company's provider."""
    context = browser.new_context(
        ignore_https_errors=True, locale="en-GB", viewport={"width": 1366, "height": 768}
    )
    page = context.new_page()
    page.goto(url + "/")
    page.click("a.button")
    page.wait_for_url(re.compile(r".*/interaction/.*"))
    page.fill("#login", "s1")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/search"))
    return page


def cookie_of(page: Any) -> str:
    value = next(c["value"] for c in page.context.cookies() if c["name"] == COOKIE)
    return f"{COOKIE}={value}"


def play(page: Any, site: Site, url: str = "") -> list[int]:
    """Open the recording, choose a purpose (once per session), play until the audio
    has advanced; the statuses of the audio answers the page received."""
    statuses: list[int] = []

    def seen(response: Any) -> None:
        if "/audio" in response.url:
            statuses.append(response.status)

    page.on("response", seen)
    if not page.url.endswith(f"/recordings/{site.rid}"):
        page.goto(f"{url or site.url}/recordings/{site.rid}")
    assert "Aino Agent" in page.inner_text("dl.facts")
    if page.locator("audio").count() == 0:
        page.select_option("#purpose", "verification")
        page.click("#start")  # a POST and a redirect: the player is on the next page
    page.wait_for_selector("audio")
    page.wait_for_function(
        "() => { const a = document.getElementById('audio'); return a && a.readyState >= 1; }"
    )
    page.evaluate("document.getElementById('audio').play()")
    page.wait_for_function(
        "() => document.getElementById('audio').currentTime > 0.3", timeout=20_000
    )
    page.evaluate("document.getElementById('audio').pause()")
    page.wait_for_load_state("networkidle")
    page.remove_listener("response", seen)
    assert page.is_hidden("#audio-error")
    return statuses


def test_a_supervisor_lists_opens_and_plays_through_both_replicas(
    site: Site, supervisor: Any
) -> None:
    page = supervisor
    assert "My team's calls" in page.inner_text("h1")
    seen, seq = len(site.haproxy_log), site.head_seq()
    assert page.locator(f"a[href='/recordings/{site.rid}']").count() == 1
    page.click(f"a[href='/recordings/{site.rid}']")
    page.wait_for_url(re.compile(rf".*/recordings/{site.rid}"))
    statuses = play(page, site)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "replicas-player.png"), full_page=True)
    assert statuses and set(statuses) == {206}
    # Per-call balancing: the page, the waveform and the audio went to both replicas.
    assert {"r0", "r1"} <= set(site.served_by(seen)), site.haproxy_log[seen:]
    events = [e for e in site.events_after(seq) if e["recording_id"] == site.rid]
    assert {e["actor"] for e in events} == {"person:s1"}
    assert all(e["outcome"] == "allowed" for e in events), events
    # The page before the purpose is chosen and after: each view audited once.
    assert [e["action"] for e in events if e["action"] == "get"] == ["get", "get"]
    assert len(site.plays(seq)) == len(statuses), "one audited play per audio answer"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_person_keeps_working_when_a_replica_goes(
    site: Site, supervisor: Any, how: signal.Signals
) -> None:
    site.all_up()
    page = supervisor
    play(page, site)  # purpose chosen, connections to both replicas open
    seen, seq = len(site.haproxy_log), site.head_seq()
    site.stores.replicas[0].daemon.stop(how)
    for _ in range(3):  # the next pages: whichever replica HAProxy picks first
        page.goto(f"{site.url}/search")
        assert page.locator(f"a[href='/recordings/{site.rid}']").count() == 1
    statuses = play(page, site)
    assert statuses and set(statuses) == {206}
    assert len(site.plays(seq)) == len(statuses), "each play audited once"
    assert set(site.served_by(seen)) == {"r1"}
    assert "level=error" not in site.web_log.read_text()  # e.g. "Exception in ASGI application"


def test_requests_in_flight_when_their_replica_dies_are_answered(
    site: Site, supervisor: Any
) -> None:
    """A page and an audio request are sent to a replica that then dies: the web asks
    again through the balancer and both are answered as if nothing happened; the dead
    replica never read them, so each play the person got is audited once."""
    site.all_up()
    play(supervisor, site)  # the purpose is chosen in this session
    cookie, seq = cookie_of(supervisor), site.head_seq()
    audio = long_opus(SECONDS)
    balancer, replica = site.stores.balancer, site.stores.replicas[0].daemon.process
    assert replica is not None
    answers: list[tuple[int, bytes]] = []
    replica.send_signal(signal.SIGSTOP)  # frozen: HAProxy's TCP check still passes
    try:
        balancer.command("disable server stores_access/r1")  # so both go to r0
        pending = [
            _in_thread(lambda: answers.append(_get(site, "/search", cookie))),
            _in_thread(lambda: answers.append(_get(site, f"/recordings/{site.rid}/audio", cookie))),
        ]
        deadline = time.monotonic() + 10
        while balancer.current("stores_access", "r0") < 2:  # both in flight on r0
            assert time.monotonic() < deadline, "the requests did not reach the replica"
            time.sleep(0.05)
        balancer.command("enable server stores_access/r1")
        replica.send_signal(signal.SIGKILL)
        for thread in pending:
            thread.join(30)
            assert not thread.is_alive(), "a request hangs after its replica died"
    finally:
        balancer.command("enable server stores_access/r1")
        replica.send_signal(signal.SIGKILL)
        replica.wait(10)
    log = site.web_log.read_text()
    assert "level=error" not in log and "store_unavailable" not in log, log[-3000:]
    assert sorted(status for status, _ in answers) == [200, 206]
    page = next(body for status, body in answers if status == 200).decode()
    assert f"/recordings/{site.rid}" in page, page[-2000:]
    assert (206, audio) in answers
    assert len(site.plays(seq)) == 1, "the play is audited once"


def test_an_audio_answer_cut_by_its_replica_dying_is_finished_by_the_other(
    site: Site, supervisor: Any
) -> None:
    """The answer is pinned to r0 (HAProxy's runtime API) and read slowly; as soon as
    its first bytes arrive r0 is frozen, mid-answer, then killed; the web continues
    from the first byte not yet sent through r1, and the listener gets the whole part."""
    site.all_up()
    supervisor.goto(f"{site.url}/recordings/{site.long_rid}")
    supervisor.select_option("#purpose", "verification")
    supervisor.click("#start")
    supervisor.wait_for_selector("audio")
    supervisor.goto(f"{site.url}/search")  # the page's player and waveform are done with
    _wait_idle(site)
    cookie, audio = cookie_of(supervisor), long_opus(LONG)
    replica = site.stores.replicas[0].daemon.process
    assert replica is not None
    balancer = site.stores.balancer
    balancer.command("disable server stores_access/r1")
    try:
        for _ in range(3):  # an answer that outran the freeze proves nothing: again
            seq = site.head_seq()
            with _slow_reader(site, f"/recordings/{site.long_rid}/audio", cookie) as tls:
                answer = tls.recv(4096)
                replica.send_signal(signal.SIGSTOP)
                held = balancer.current("stores_access", "r0") > 0
                if held:
                    balancer.command("enable server stores_access/r1")
                    replica.send_signal(signal.SIGKILL)
                else:
                    replica.send_signal(signal.SIGCONT)
                while chunk := tls.recv(65536):
                    answer += chunk
            headers, _, body = answer.partition(b"\r\n\r\n")
            assert b"content-range: bytes 0-1048575/" in headers.lower(), headers
            assert body == audio[: 1024 * 1024], f"{len(body)} bytes, not the first MiB"
            if held:
                break
        else:
            raise AssertionError("every answer had left r0 before it was frozen")
    finally:
        balancer.command("enable server stores_access/r1")
        replica.send_signal(signal.SIGKILL)
        replica.wait(10)
    log = site.web_log.read_text()
    assert "event=audio_resumed" in log and "level=error" not in log, log[-3000:]
    # Two reads of the store, each audited: the part asked of the dead replica, and
    # the rest of it asked of the live one.
    plays = [e["detail"] for e in site.plays(seq, site.long_rid)]
    assert len(plays) == 2 and plays[0] == "channel=web bytes=0-1048575", plays
    assert re.fullmatch(r"channel=web bytes=[1-9]\d*-1048575", plays[1]), plays


def test_through_a_tcp_balancer_the_web_reconnects_when_its_replica_dies(
    site: Site, browser: Any
) -> None:
    """HAProxy in TCP mode (TLS passed through): the web's one connection goes to one
    replica; that replica is killed; the next page and play reconnect through the
    balancer to the other."""
    site.all_up()
    page = sign_in(browser, site.tcp_url)
    deadline = time.monotonic() + 10
    while not (held := [r for r in site.stores.replicas
                        if site.stores.balancer.current("stores_access_tcp", r.name)]):  # fmt: skip
        assert time.monotonic() < deadline, "the web holds no connection through HAProxy"
        time.sleep(0.05)
    assert len(held) == 1, "one connection, one replica"
    seq = site.head_seq()
    held[0].daemon.stop(signal.SIGKILL)
    page.goto(f"{site.tcp_url}/search")
    assert page.locator(f"a[href='/recordings/{site.rid}']").count() == 1
    statuses = play(page, site, site.tcp_url)
    assert statuses and set(statuses) == {206}
    assert len(site.plays(seq)) == len(statuses), "each play audited once"
    log = (site.root / "web-tcp.log").read_text()
    assert "level=error" not in log and "store_unavailable" not in log, log[-3000:]
    page.context.close()


@contextmanager
def _slow_reader(site: Site, path: str, cookie: str) -> Iterator[ssl.SSLSocket]:
    """An HTTPS GET of ``path`` (bytes=0-) on a socket with a tiny receive buffer: what
    the test does not read holds the web, and through it the store, back."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    port = int(site.url.rpartition(":")[2])
    raw.connect(("127.0.0.1", port))
    ctx = ssl.create_default_context(cafile=str(site.ca))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.settimeout(30)
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n"
                   "Range: bytes=0-\r\nConnection: close\r\n\r\n")  # fmt: skip
        tls.sendall(request.encode())
        yield tls


def _wait_idle(site: Site) -> None:
    deadline = time.monotonic() + 30
    while any(site.stores.balancer.current("stores_access", r.name) for r in site.stores.replicas):
        assert time.monotonic() < deadline, "the replicas are still answering the page"
        time.sleep(0.05)


def _get(site: Site, path: str, cookie: str) -> tuple[int, bytes]:
    range_ = {"range": "bytes=0-"} if path.endswith("/audio") else {}
    status, _, body = https_get(site.url + path, site.ca, cookie, timeout=60, **range_)
    return status, body


def _in_thread(work: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread
