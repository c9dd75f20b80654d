"""The central store daemon: gRPC ingest for agents, the operator console on a local
socket, health checking. ``startup()`` / ``run()`` / ``shutdown()`` like uvicorn's Server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent import logs, sdnotify
from agent.certs import server_credentials
from agent.config import StoreConfig, check_transport
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import check_private_file
from agent.store.access_service import add_access_service
from agent.store.catalog import Catalog
from agent.store.console import ConsoleService
from agent.store.ingest import MAX_CHUNK_BYTES, IngestService
from agent.store.sweeper import Sweeper, SweeperLoop
from agent.store.vault import open_storage

log = logs.get_logger(__name__)

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
        self.exit_code = 0

    @property
    def console_socket(self) -> str:
        return str(self.config.data_dir / "console.sock")

    async def startup(self) -> None:
        cfg = self.config
        check_transport(cfg)
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        storage = await asyncio.to_thread(open_storage, cfg)
        catalog, vault = storage.catalog, storage.vault
        self._catalog = catalog
        ingest = IngestService(
            catalog,
            vault,
            cfg.incoming_dir,
            cfg.allowed_regions,
            authenticate=cfg.tls is not None,
            seal_key_file=cfg.seal_key_file,
        )

        public = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_IngestServicer_to_server(ingest, public)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, public)
        self.port = _bind(public, cfg)
        servers = [public]
        if cfg.access_listen is None:
            add_access_service(public, cfg, catalog, vault)  # people's access (issue 8)
        else:
            people = grpc.aio.server(options=SERVER_OPTIONS)
            add_access_service(people, cfg, catalog, vault)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, people)
            self.access_port = _bind_people(people, cfg, cfg.access_listen)
            servers.append(people)

        console = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ConsoleServicer_to_server(ConsoleService(catalog, vault), console)
        if os.path.exists(self.console_socket):
            os.unlink(self.console_socket)
        old_umask = os.umask(0o177)
        try:
            console.add_insecure_port(f"unix:{self.console_socket}")
            for server in servers:
                await server.start()
            await console.start()
        finally:
            os.umask(old_umask)
        self._servers = [*servers, console]
        self._sweeper = SweeperLoop(Sweeper.from_config(cfg, catalog, vault), cfg.sweep_interval_s)
        self._sweeper.start()
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

    @property
    def engine_name(self) -> str:
        return self._catalog.engine.dialect.name if self._catalog else "none"

    async def run(self) -> None:
        interval = sdnotify.watchdog_interval()
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=(interval or 30) / 2)
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
        await asyncio.gather(*(s.stop(grace_s) for s in self._servers))
        if self._sweeper is not None:
            await asyncio.to_thread(self._sweeper.join, grace_s)
        if self._catalog is not None:
            self._catalog.close()
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


def _bind_people(server: grpc.aio.Server, cfg: StoreConfig, listen: str) -> int:
    """People's port: TLS with the store's certificate; a person's token says who they
    are (no client certificate to hand out to every employee)."""
    if cfg.tls is not None:
        check_private_file(cfg.tls.key_file)
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls.key_file.read_bytes(), cfg.tls.cert_file.read_bytes())],
            require_client_auth=False,
        )
        port = server.add_secure_port(listen, credentials)
    else:
        log.warning("access_insecure", listen=listen, tls="OFF")
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"[store] access_listen = {listen!r}: cannot bind")
    log.info("access_listening", address=f"{listen.rpartition(':')[0]}:{port}")
    return port


def _bind(server: grpc.aio.Server, cfg: StoreConfig) -> int:
    """Mutual TLS (agents prove their site with a certificate from our CA), or plain
    text on loopback when the config asks for it explicitly."""
    if cfg.tls is not None:
        tls = cfg.tls
        check_private_file(tls.key_file)
        credentials = server_credentials(tls.ca_file, tls.cert_file, tls.key_file)
        port = server.add_secure_port(cfg.listen, credentials)
    else:
        log.warning(
            "store_insecure",
            listen=cfg.listen,
            tls="OFF",
            reason="[store.tls] insecure = true: agents are NOT authenticated and their site is "
            "taken on trust; for a loopback test install only",
        )
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"[store] listen = {cfg.listen!r}: cannot bind")
    return port


async def serve(config: StoreConfig) -> int:
    server = StoreServer(config)
    server.install_signal_handlers()
    await server.startup()
    try:
        await server.run()
    finally:
        await server.shutdown()
    return server.exit_code
