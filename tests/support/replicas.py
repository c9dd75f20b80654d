"""Several real `callrec store` processes on one catalog and one bucket, behind a real
HAProxy (Debian's, TCP mode: TLS passes through to the stores, round robin per
connection), and in-process agents (the real ``Uplink``, one connection each through
the balancer) draining one outbox. For tests/test_replicas.py and
tests/bench/replicas.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from agent.capture import (
    utc_now,
)
from agent.recorder.uplink.client import CHANNEL_OPTIONS, Uplink
from agent.recorder.uplink.outbox import Outbox
from tests.support.calls import call_meta
from tests.support.calls import outbox_entry as outbox_entry_of
from tests.support.daemons import Daemon
from tests.support.pki import Pki
from tests.support.services import free_tcp_port, write_store_toml
from tests.support.stack import Keys, agent_config

HAPROXY = "/usr/sbin/haproxy"

HAPROXY_CFG = """\
global
    maxconn 4096
    stats socket {socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 10m
    timeout server 10m
    retries 2
    option redispatch

frontend ingest
    bind 127.0.0.1:{ingest_port}
    default_backend stores

backend stores
    balance roundrobin
    default-server check inter 300ms fall 1 rise 2
{ingest_servers}

{access}"""

ACCESS_TCP = """
frontend access
    bind 127.0.0.1:{access_port}
    default_backend stores_access

backend stores_access
    balance roundrobin
    default-server check inter 300ms fall 1 rise 2
{access_servers}
"""

# gRPC-aware: HAProxy ends the people's TLS (its certificate with the balancer's name)
# and balances each call, not each connection, over new TLS to the stores. The check is
# a TCP connect (no-check-ssl), so a frozen (SIGSTOPped) store stays in rotation for the
# tests that put a request in flight on it; README's example uses check-ssl instead.
ACCESS_HTTP = """
frontend access
    mode http
    bind 127.0.0.1:{access_port} ssl crt {pem} alpn h2
    log stderr format raw local0 info
    option httplog
    default_backend stores_access

backend stores_access
    mode http
    balance roundrobin
    default-server check no-check-ssl inter 300ms fall 1 rise 2
    default-server ssl verify required ca-file {ca} alpn h2
{access_servers}

frontend access_tcp
    bind 127.0.0.1:{access_tcp_port}
    default_backend stores_access_tcp

backend stores_access_tcp
    balance roundrobin
    default-server check inter 300ms fall 1 rise 2
{access_servers}
"""


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Replica:
    name: str
    port: int
    access_port: int
    daemon: Daemon
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        seen = len(self.daemon.text())
        self.daemon.start()
        self.daemon.wait_for(r"event=store_ready", timeout=timeout, after=seen)
        self.starts += 1


class HAProxy:
    """``access_tls``: (CA, certificate, key) files to end the people's TLS at HAProxy and
    balance every gRPC call (HTTP/2 mode; the TCP mode beside it on ``access_tcp_port``);
    None: TCP mode only, TLS passed through."""

    def __init__(
        self, root: Path, replicas: list[Replica], access_tls: tuple[Path, Path, Path] | None
    ) -> None:
        self.root = root
        self.ingest_port, self.access_port = free_tcp_port(), free_tcp_port()
        self.access_tcp_port = free_tcp_port()  # with access_tls: Access in TCP mode too
        self.config = root / "haproxy.cfg"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.access_port}" for r in replicas)
        if access_tls is None:
            access = ACCESS_TCP.format(access_port=self.access_port, access_servers=servers)
        else:
            pem = root / "haproxy-access.pem"
            pem.write_bytes(access_tls[1].read_bytes() + access_tls[2].read_bytes())
            pem.chmod(0o600)
            access = ACCESS_HTTP.format(
                access_port=self.access_port, access_servers=servers, pem=pem, ca=access_tls[0],
                access_tcp_port=self.access_tcp_port,
            )  # fmt: skip
        self.config.write_text(
            HAPROXY_CFG.format(
                ingest_port=self.ingest_port,
                ingest_servers="\n".join(
                    f"    server {r.name} 127.0.0.1:{r.port}" for r in replicas
                ),
                access=access,
                socket=root / "haproxy.sock",
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [HAPROXY, "-c", "-f", str(self.config)]
        checked = subprocess.run(args, check=False, capture_output=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        log = (self.root / "haproxy.log").open("ab")
        self.process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)], stdout=log, stderr=log
        )
        log.close()
        wait_port(self.ingest_port)
        wait_port(self.access_port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def command(self, line: str) -> str:
        """One command of HAProxy's runtime API (its stats socket), e.g.
        ``disable server stores_access/r1``; its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.root / "haproxy.sock"))
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def current(self, backend: str, server: str) -> int:
        """Requests (HTTP mode) or connections (TCP) the server is handling now."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") == server:
                return int(row["scur"] or 0)
        raise AssertionError(f"haproxy: no server {backend}/{server}")


class StoreReplicas:
    """``count`` stores sharing ``shared`` ([store] keys: catalog, blobs, s3, keys, …),
    each with its own data_dir and ports, behind one HAProxy (``access_tls``: see
    HAProxy)."""

    def __init__(
        self,
        root: Path,
        count: int,
        shared: dict[str, Any],
        access_tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.root = root
        self.replicas: list[Replica] = []
        for i in range(count):
            name = f"r{i}"
            port, access_port = free_tcp_port(), free_tcp_port()
            doc = {
                **shared,
                "listen": f"127.0.0.1:{port}",
                "access_listen": f"127.0.0.1:{access_port}",
                "data_dir": str(root / name / "data"),
            }
            (root / name).mkdir(parents=True, exist_ok=True)
            config = write_store_toml(root / name / "store.toml", doc)
            daemon = Daemon(name, ["store", "--config", str(config)], root / name / "store.log")
            self.replicas.append(Replica(name, port, access_port, daemon))
        self.balancer = HAProxy(root, self.replicas, access_tls)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.balancer.ingest_port}"

    @property
    def access_address(self) -> str:
        return f"127.0.0.1:{self.balancer.access_port}"

    def start(self, together: bool = False) -> None:
        """The first replica alone (it makes the master key on a new catalog, the file
        all share), then the others at once, then the balancer. ``together``: all at
        once (the caller has made the key, e.g. with ``open_storage``)."""
        first = 0 if together else 1
        if not together:
            self.replicas[0].start()
        rest = [threading.Thread(target=r.start) for r in self.replicas[first:]]
        for t in rest:
            t.start()
        for t in rest:
            t.join(90)
        for r in self.replicas:
            assert r.starts, f"{r.name} did not start:\n{r.daemon.text()[-2000:]}"
        self.balancer.start()

    def config_file(self, i: int) -> Path:
        return self.root / self.replicas[i].name / "store.toml"

    def kill(self, i: int) -> None:
        self.replicas[i].daemon.stop(signal.SIGKILL)

    def stop(self, i: int) -> int | None:
        return self.replicas[i].daemon.stop(signal.SIGTERM)

    def restart(self, i: int) -> None:
        self.replicas[i].start()

    def close(self) -> None:
        self.balancer.stop()
        for r in self.replicas:
            r.daemon.stop()

    def logs(self) -> dict[str, str]:
        return {r.name: r.daemon.text() for r in self.replicas}


# ---------------------------------------------------------------- agents


def outbox_entry(outbox_dir: Path, keys: Keys, data: bytes, ended: dt.datetime) -> str:
    """An outbox entry as finalize writes it (employee a1 of access_world.PEOPLE)."""
    meta = call_meta(keys, ended - dt.timedelta(seconds=30), ended, ("a1", "Aino Agent"))
    sha256 = hashlib.sha256(data).hexdigest()
    return outbox_entry_of(outbox_dir, meta, len(data), sha256, lambda p: p.write_bytes(data))


@dataclass
class Agents:
    """``clients`` uplinks (each its own connection through the balancer), each with
    ``workers`` threads, draining one outbox; an entry left after a pass (deferred) is
    offered again, as the agent's rescan does."""

    root: Path
    keys: Keys
    pki: Pki
    address: str
    clients: int = 6
    workers: int = 2
    chunk_bytes: int = 256 * 1024
    made: dict[str, str] = field(default_factory=dict)  # recording id → sha256
    ready_at: dict[str, float] = field(default_factory=dict)  # monotonic, at hang-up
    safe_at: dict[str, float] = field(default_factory=dict)  # monotonic, at the receipt

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        uplink = {**self.pki.agent_uplink, "chunk_bytes": self.chunk_bytes, "backoff_max": "2s"}
        self.config, _ = agent_config(self.root, self.keys, self.address, uplink=uplink)
        self.outbox = Outbox(self.config.outbox_dir)
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.uplinks = [
            Uplink(self.config.uplink, self.outbox, self.config.quarantine_dir, self._channel())
            for _ in range(self.clients)
        ]

    def _channel(self) -> grpc.Channel:
        creds = self.pki.credentials()
        # Its own connection (grpc shares one between like channels of a process).
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        return grpc.secure_channel(self.address, creds, options=options)

    def add(self, data: bytes, ended: dt.datetime | None = None) -> str:
        rid = outbox_entry(self.outbox.root, self.keys, data, ended or utc_now())
        self.made[rid] = hashlib.sha256(data).hexdigest()
        self.ready_at[rid] = time.monotonic()
        self._queue.put(rid)
        return rid

    def start(self) -> None:
        for uplink in self.uplinks:
            for _ in range(self.workers):
                thread = threading.Thread(target=self._work, args=(uplink,), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _work(self, uplink: Uplink) -> None:
        while not self._stop.is_set():
            try:
                rid = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            uplink.handle(rid)
            if (self.outbox.root / rid).exists():
                time.sleep(0.2)
                self._queue.put(rid)  # deferred: the rescan offers it again
            else:
                self.safe_at[rid] = time.monotonic()

    def left(self) -> int:
        return len(self.outbox.entries())

    def wait_empty(self, timeout: float, tick: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self.left():
            assert time.monotonic() < deadline, f"{self.left()} recordings still in the outbox"
            if tick is not None:
                tick()
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        for uplink in self.uplinks:
            uplink.stop_event.set()
        for thread in self._threads:
            thread.join(30)
        for uplink in self.uplinks:
            uplink.close()
