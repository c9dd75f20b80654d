"""The agent's recording control API: HTTP/JSON for the agent desktop, the ACD or the
IVR (``[control]``; OpenAPI document at ``/openapi.json``, shipped as
``agent/recorder/control/openapi.json``).

Every request but ``/openapi.json`` is authenticated — a bearer token of
``tokens_file`` or, with ``ca_file``/``cert_file``/``key_file``, a client certificate
of that CA (mutual TLS) — before its body is read. Bodies are JSON objects of at most
``MAX_BODY`` bytes; anything else is refused (400/401/411/413/415) and changes
nothing. Each request is logged with the integration, the operation and its outcome
(``control_request``/``control_refused``), and a pause is stored with who asked
(``api:<integration>``).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from agent import logs
from agent.config import ConfigError, ControlConfig
from agent.recorder.control.desk import SELECTORS, ControlDesk, Reply
from agent.recorder.control.tokens import Tokens

log = logs.get_logger(__name__)

MAX_BODY = 4096
MAX_VALUE = 256
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT_S = 5.0
OPS = ("pause", "resume", "discard", "employee")
_ID = re.compile(r"[0-9a-f]{32}")


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def openapi_document() -> bytes:
    return resources.files("agent.recorder.control").joinpath("openapi.json").read_bytes()


def _selector(doc: dict[str, Any]) -> tuple[str, str]:
    """The one selector of a request (``recording_id``, ``call_id``, ``extension``,
    ``sip`` or ``person``) and its value."""
    given = [key for key in SELECTORS if key in doc]
    if len(given) != 1:
        raise Refused(400, "expected exactly one of " + ", ".join(SELECTORS))
    value = doc[given[0]]
    if not isinstance(value, str) or not 0 < len(value) <= MAX_VALUE or not value.isprintable():
        raise Refused(400, f"{given[0]}: expected a string of 1..{MAX_VALUE} characters")
    return given[0], value


class _Handler(BaseHTTPRequestHandler):
    server: ControlHttpServer
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "callrec-control"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        return  # every request gets our own line (control_request / control_refused)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._send(Reply(405, {"error": "method not allowed"}))

    do_DELETE = do_PATCH = do_PUT

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path)
        if method == "GET" and path.path == "/openapi.json":
            self._send_raw(200, openapi_document())
            return
        integration = "-"
        try:
            integration = self._authenticate()
            op, reply, rid = self._route(method, path.path, path.query, integration)
        except Refused as exc:
            self._refused(exc, integration)
            return
        log.info(
            "control_request", integration=integration, op=op, recording_id=rid or "-",
            status=reply.status, error=reply.doc.get("error", "-"),
        )  # fmt: skip
        self._send(reply)

    def _refused(self, exc: Refused, integration: str) -> None:
        log.warning(
            "control_refused", integration=integration, peer=self.client_address[0],
            status=exc.status, reason=str(exc),
        )  # fmt: skip
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        self._send(Reply(exc.status, {"error": str(exc)}), headers, close=True)

    def _authenticate(self) -> str:
        cert = self.server.peer_name(self.connection)
        if cert is not None:
            return cert
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        name = self.server.tokens.integration(token.strip()) if scheme == "Bearer" else None
        if name is None:
            raise Refused(401, "missing or unknown bearer token")
        return name

    def _route(
        self, method: str, path: str, query: str, integration: str
    ) -> tuple[str, Reply, str | None]:
        parts = [p for p in path.split("/") if p]
        desk, who = self.server.desk, f"api:{integration}"
        if method == "GET" and parts == ["calls"]:
            key, value = _selector(dict(parse_qsl(query, max_num_fields=4)))
            return "status", desk.status(key, value), None
        if method == "GET" and len(parts) == 2 and parts[0] == "calls":
            rid = self._recording_id(parts[1])
            return "status", desk.status("recording_id", rid), rid
        if method == "POST" and len(parts) in (2, 3) and parts[0] == "calls" and parts[-1] in OPS:
            body = self._body()
            if len(parts) == 3:
                key, value = "recording_id", self._recording_id(parts[1])
            else:
                key, value = _selector(body)
            reply = desk.command(parts[-1], key, value, who, body)
            rid = value if key == "recording_id" else reply.doc.get("call", {}).get("recording_id")
            return parts[-1], reply, rid
        raise Refused(404, f"no such operation: {method} {path[:100]}")

    @staticmethod
    def _recording_id(value: str) -> str:
        if not _ID.fullmatch(value):
            raise Refused(400, "recording id: expected 32 lower-case hex digits")
        return value

    def _body(self) -> dict[str, Any]:
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if self.headers.get("Transfer-Encoding"):
                raise Refused(411, "Content-Length required (no chunked bodies)")
            return {}
        try:
            length = int(length_text)
        except ValueError:
            raise Refused(400, "Content-Length: expected a number") from None
        if not 0 <= length <= MAX_BODY:
            raise Refused(413, f"body larger than {MAX_BODY} bytes")
        if length == 0:
            return {}
        if self.headers.get_content_type() != "application/json":
            raise Refused(415, "Content-Type: expected application/json")
        try:
            doc = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "body: not JSON") from None
        if not isinstance(doc, dict):
            raise Refused(400, "body: expected a JSON object")
        return doc

    def _send(
        self, reply: Reply, headers: dict[str, str] | None = None, close: bool = False
    ) -> None:
        self._send_raw(reply.status, json.dumps(reply.doc).encode(), headers, close)

    def _send_raw(
        self, status: int, data: bytes, headers: dict[str, str] | None = None, close: bool = False
    ) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class ControlHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, cfg: ControlConfig, desk: ControlDesk) -> None:
        host, _, port = cfg.listen.rpartition(":")
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host.strip("[]"), int(port)), _Handler)
        self.desk = desk
        self.tokens = Tokens.load(cfg.tokens_file)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.tls = cfg.tls is not None
        if cfg.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
            context.load_verify_locations(cfg.tls.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
            # The handshake runs in the connection's thread, not in the accept loop.
            self.socket = context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def peer_name(self, connection: Any) -> str | None:
        """The client certificate's common name (mutual TLS), or None."""
        if not isinstance(connection, ssl.SSLSocket):
            return None
        cert: dict[str, Any] = dict(connection.getpeercert() or {})
        for rdn in cert.get("subject", ()):
            for pair in rdn:
                if pair[0] == "commonName":  # as a pause's who: api:<name>
                    return re.sub(r"[^A-Za-z0-9._@-]", "_", str(pair[1]))[:40] or "-"
        return None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, not socketserver's traceback on stderr (a client gone mid-answer)."""
        log.warning("control_connection_failed", peer=str(client_address[0]))

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # more than MAX_CONNECTIONS at once
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                request.settimeout(REQUEST_TIMEOUT_S)
                request.do_handshake()
            super().process_request_thread(request, client_address)
        except (OSError, ssl.SSLError):
            self.shutdown_request(request)
        finally:
            self._slots.release()


class ControlServer:
    """The API's loop: ``start()`` serves in a thread, ``stop()`` ends it."""

    def __init__(self, cfg: ControlConfig, desk: ControlDesk) -> None:
        self.cfg = cfg
        self.http = ControlHttpServer(cfg, desk)
        self._thread = threading.Thread(
            target=self.http.serve_forever, name="control-api", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.http.server_address[1])

    def start(self) -> ControlServer:
        self._thread.start()
        log.info(
            "control_listening", listen=f"{self.cfg.listen.rpartition(':')[0]}:{self.port}",
            tls="mutual" if self.http.tls else "off", tokens=len(self.http.tokens.by_digest),
        )  # fmt: skip
        return self

    def reload_tokens(self) -> None:
        """SIGHUP: the tokens file again (a broken one keeps the tokens in use)."""
        try:
            self.http.tokens = Tokens.load(self.cfg.tokens_file)
        except ConfigError as exc:
            log.error("control_tokens_reload_failed", reason=str(exc), kept="previous")
            return
        log.info("control_tokens_reloaded", tokens=len(self.http.tokens.by_digest))

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self._thread.join(5)
