"""``callrec web``: serve the app over HTTPS with uvicorn (one process)."""

from __future__ import annotations

import uvicorn

from agent import logs
from agent.web.app import create_app
from agent.web.config import WebConfig

log = logs.get_logger(__name__)


def serve(config: WebConfig) -> None:
    host, _, port = config.listen.rpartition(":")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=host.strip("[]"),
            port=int(port),
            ssl_certfile=str(config.tls_cert),
            ssl_keyfile=str(config.tls_key),
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=5,
        )
    )
    log.info("web_starting", listen=config.listen, store=config.store_address)
    server.run()
