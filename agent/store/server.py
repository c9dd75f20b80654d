"""The central store daemon: gRPC ingest for agents, the operator console on a local
socket, health checking. ``startup()`` / ``run()`` / ``shutdown()`` like uvicorn's Server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.registry import Collector

from agent import logs, metrics, sdnotify
from agent.certs import server_credentials
from agent.config import ConfigError, StoreConfig, check_transport
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import check_private_file
from agent.store.access.service import AccessService, add_access_service
from agent.store.archive.vault import Vault, open_partials, open_storage
from agent.store.catalog import Catalog
from agent.store.console import ConsoleService
from agent.store.console_gate import ConsoleGate
from agent.store.datadir import DataDirLock
from agent.store.ingest.limits import Limits
from agent.store.ingest.service import MAX_CHUNK_BYTES, IngestService
from agent.store.live import archive_queue
from agent.store.live.archiver import LiveArchiver
from agent.store.live.segments import LiveStore
from agent.store.live.service import LiveService
from agent.store.monitoring import StoreCollector, store_status
from agent.store.retention.sweeper import Sweeper, SweeperLoop
from agent.store.rpc_errors import ErrorBoundary

log = logs.get_logger(__name__)

STATUS_INTERVAL_S = 5.0
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024
# Keepalive: the server pings a silent peer every 60 s (a vanished agent frees its
# upload within ~80 s). It accepts client pings as often as every 15 s, with or
# without calls in flight; the agent pings every 30 s (uplink.CHANNEL_OPTIONS), so it
# never collects a GOAWAY "too_many_pings". tests/test_faults.py checks the two agree.
MIN_CLIENT_PING_INTERVAL_MS = 15_000
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 2),
    # grpcio sets SO_REUSEPORT by default: a second store would bind the same port and
    # silently take a share of the uploads. Off, so a port in use fails the start.
    ("grpc.so_reuseport", 0),
    # Streams one connection may hold open (HTTP/2 SETTINGS); the per-site upload cap
    # (ingest.UploadLimits) bounds what all of a site's connections hold together.
    ("grpc.max_concurrent_streams", 64),
]


class StoreServer:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.stop_event = asyncio.Event()
        self.port = 0
        self.access_port: int | None = None
        self._servers: list[grpc.aio.Server] = []
        self._catalog: Catalog | None = None
        self._sweeper: SweeperLoop | None = None
        self._archiver: LiveArchiver | None = None
        self._live: LiveService | None = None
        self._lock = DataDirLock(config.data_dir)
        self._gate = ConsoleGate(
            config.data_dir / "console.sock", config.data_dir / "console.inner.sock"
        )
        self.access: AccessService | None = None
        self.ingest: IngestService | None = None
        self.metrics_port: int | None = None
        self.exit_code = 0

    @property
    def console_socket(self) -> str:
        return str(self.config.data_dir / "console.sock")

    async def startup(self) -> None:
        cfg = self.config
        check_transport(cfg)
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock.acquire()
        try:
            await self._start()
        except BaseException:
            await asyncio.gather(*(s.stop(0) for s in self._servers))
            if self._catalog is not None:
                self._catalog.close()
            self._lock.release()
            raise

    async def _start(self) -> None:
        cfg = self.config
        storage = await asyncio.to_thread(open_storage, cfg)
        catalog, vault = storage.catalog, storage.vault
        self._catalog = catalog
        ingest = IngestService(
            catalog,
            vault,
            cfg.incoming_dir,
            cfg.allowed_regions,
            authenticate=cfg.tls is not None,
            limits=Limits(cfg.max_uploads_per_site, cfg.max_incoming_bytes_per_site),
            idle_timeout_s=cfg.upload_idle_timeout_s,
            seal_key_file=cfg.seal_key_file,
            partials=open_partials(cfg, vault),
        )

        boundary = ErrorBoundary()  # no exception's text reaches a client (rpc_errors)
        self.ingest = ingest
        public = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[boundary])
        pb_grpc.add_IngestServicer_to_server(ingest, public)
        live = LiveStore(catalog, vault, cfg.incoming_dir, cfg.live_tail_window_s)
        # a discarded call's live segments go too
        ingest.destroy_live = functools.partial(archive_queue.destroy, live)
        self._archiver = LiveArchiver(live, cfg.live_timeout_s, cfg.live_encoders)
        self._live = LiveService(ingest, live, self._archiver)
        pb_grpc.add_LiveServicer_to_server(self._live, public)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, public)
        self.port = _bind(public, cfg)
        servers = [public]
        self._servers = servers
        if cfg.access_listen is None:
            access = add_access_service(public, cfg, catalog, vault)  # people's (issue 8)
        else:
            people = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[boundary])
            access = add_access_service(people, cfg, catalog, vault)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, people)
            self.access_port = _bind_people(people, cfg, cfg.access_listen)
            servers.append(people)
        if access is not None:
            boundary.add("/callrec.v1.Access/", access.failed)
        self.access = access

        console = self._console(ConsoleService(catalog, vault, cfg.directory_file), boundary)
        for server in servers:
            await server.start()
        await console.start()
        self._servers = [*servers, console]
        await self._gate.start()
        self._archiver.start()
        if cfg.sweep_by == "store":  # else callrec-sweep.timer sweeps (one scheduler)
            sweeper = Sweeper.from_config(cfg, catalog, vault)
            self._sweeper = SweeperLoop(sweeper, cfg.sweep_interval_s)
            self._sweeper.start()
        if cfg.metrics_listen is not None:
            self.metrics_port = metrics.serve(
                cfg.metrics_listen, extra=_collectors(cfg, vault), exclude=metrics.AGENT_FAMILIES
            )
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_servicer.set("callrec.v1.Ingest", health_pb2.HealthCheckResponse.SERVING)
        host = cfg.listen.rpartition(":")[0]
        log.info(
            "store_ready",
            address=f"{host}:{self.port}",
            console=self.console_socket,
            catalog=self.engine_name,
            blobs=cfg.blobs,
            region=vault.region,
            tls="mutual" if cfg.tls else "OFF",
        )
        sdnotify.ready()

    def _console(self, service: ConsoleService, boundary: ErrorBoundary) -> grpc.aio.Server:
        """The console's grpc server, listening inside the 0700 data directory;
        ``console.sock`` is the relay that learns each client's uid (``console_gate``)."""
        console = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[boundary])
        pb_grpc.add_ConsoleServicer_to_server(service, console)
        inner = self.config.data_dir / "console.inner.sock"
        if inner.exists():
            inner.unlink()
        old_umask = os.umask(0o177)
        try:
            console.add_insecure_port(f"unix:{inner}")
        finally:
            os.umask(old_umask)
        return console

    @property
    def engine_name(self) -> str:
        return self._catalog.engine.dialect.name if self._catalog else "none"

    async def run(self) -> None:
        interval = sdnotify.watchdog_interval()
        while not self.stop_event.is_set():
            sdnotify.status(store_status(self.config))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=_tick(interval))
            if self._archiver is not None and not self._archiver.is_alive():
                log.error("store_loop_died", loop="live_archiver")
                self.exit_code = 1
                self.stop_event.set()
                break
            if self._sweeper is not None and not self._sweeper.is_alive():
                log.error("store_loop_died", loop="sweeper")
                self.exit_code = 1
                self.stop_event.set()
                break
            sdnotify.watchdog()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        sdnotify.stopping()
        log.info("store_stopping", grace_s=round(grace_s))
        if self._sweeper is not None:
            self._sweeper.stop()
        await self._gate.stop()
        await asyncio.gather(*(s.stop(grace_s) for s in self._servers))
        if self._live is not None:
            await asyncio.to_thread(self._live.close)
        if self._archiver is not None:
            await asyncio.to_thread(self._archiver.stop, grace_s)
        if self.access is not None:
            await self.access.flush()  # counts of unauthenticated failures still held
        if self._sweeper is not None:
            await asyncio.to_thread(self._sweeper.join, grace_s)
        if self._catalog is not None:
            self._catalog.close()
        self._lock.release()
        log.info("store_stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop_event.is_set():
            log.warning("store_forced_exit")
            os._exit(1)
        self.stop_event.set()


def _tick(watchdog_s: float | None) -> float:
    """The main loop's period: half the watchdog, and STATUS= every 5 s at most."""
    return min(STATUS_INTERVAL_S, (watchdog_s or 30) / 2)


def _collectors(cfg: StoreConfig, vault: Vault) -> list[Collector]:
    collectors: list[Collector] = [
        StoreCollector(
            vault.catalog,
            vault.wrapper,
            cfg.data_dir,
            cfg.retention_months,
            cfg.sweep_interval_s if cfg.sweep_by == "store" else 0.0,
        ),
        metrics.DiskSpace(cfg.data_dir),
    ]
    if cfg.tls is not None:
        files = {"server": cfg.tls.cert_file, "ca": cfg.tls.ca_file}
        collectors.append(metrics.CertificateExpiry(files))
    return collectors


def _bind_people(server: grpc.aio.Server, cfg: StoreConfig, listen: str) -> int:
    """People's port: TLS with the store's certificate; a person's token says who they
    are (no client certificate to hand out to every employee)."""
    if cfg.tls is not None:
        check_private_file(cfg.tls.key_file)
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls.key_file.read_bytes(), cfg.tls.cert_file.read_bytes())],
            require_client_auth=False,
        )
        port = _add_port(server, listen, "access_listen", credentials)
    else:
        log.warning("access_insecure", listen=listen, tls="OFF")
        port = _add_port(server, listen, "access_listen", None)
    if port == 0:
        raise ConfigError(f"[store] access_listen = {listen!r}: cannot bind")
    log.info("access_listening", address=f"{listen.rpartition(':')[0]}:{port}")
    return port


def _bind(server: grpc.aio.Server, cfg: StoreConfig) -> int:
    """Mutual TLS (agents prove their site with a certificate from our CA), or plain
    text on loopback when the config asks for it explicitly."""
    if cfg.tls is not None:
        tls = cfg.tls
        check_private_file(tls.key_file)
        credentials = server_credentials(tls.ca_file, tls.cert_file, tls.key_file)
        port = _add_port(server, cfg.listen, "listen", credentials)
    else:
        log.warning(
            "store_insecure",
            listen=cfg.listen,
            tls="OFF",
            reason="[store.tls] insecure = true: agents are NOT authenticated and their site is "
            "taken on trust; for a loopback test install only",
        )
        port = _add_port(server, cfg.listen, "listen", None)
    return port


def _add_port(
    server: grpc.aio.Server,
    address: str,
    key: str,
    credentials: grpc.ServerCredentials | None,
) -> int:
    """Bind, or fail the start with one line (a port in use: another store?). The port
    is tried with a plain socket first: grpc's own failure also prints a C-core line."""
    if not _port_free(address):
        port = 0
    else:
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
    if port == 0:
        raise ConfigError(
            f"[store] {key} = {address!r}: cannot bind (the port is in use, by another "
            "callrec store or another program, or the address is not this host's)"
        )
    return port


def _port_free(address: str) -> bool:
    """Whether ``host:port`` can be bound now (port 0: always)."""
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError):
        return True  # let grpc say what is wrong with it
    if port == 0 or not infos:
        return True
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As grpc binds: a listener refuses the probe, connections of a store that
        # stopped a moment ago (TIME_WAIT) don't (else a restart fails for a minute).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError:
            return False
    return True


async def serve(config: StoreConfig) -> int:
    server = StoreServer(config)
    server.install_signal_handlers()
    await server.startup()
    try:
        await server.run()
    finally:
        await server.shutdown()
    return server.exit_code
