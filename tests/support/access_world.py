"""A running store with the Access service, a directory of people with tokens, and
recordings made through the real vault/catalog (fast) or the real Ingest service."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import os
import secrets
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from pydub.generators import Sine

from agent.config import StoreConfig, store_config_from_dict
from agent.manifest import timestamp
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import Protector
from agent.store.access import tokens
from agent.store.access.service import AccessService
from agent.store.archive.vault import Storage, open_storage
from agent.store.audit.chain import audit_events, audit_head
from agent.store.catalog import from_ms, now_ms
from tests.support.services import make_row
from tests.support.stack import InProcessStore, Keys

PEOPLE = """\
[[person]]
id = "a1"
name = "Aino Agent"
role = "agent"
team = "parcels"
supervisor = "s1"
trained = 2025-01-10

[[person]]
id = "a2"
name = "Mikko Agent"
role = "agent"
team = "telesales"
supervisor = "s2"
trained = 2025-01-10

[[person]]
id = "a3"
name = "Untrained Agent"
role = "agent"
team = "parcels"
supervisor = "s1"

[[person]]
id = "s1"
name = "Sari Supervisor"
role = "supervisor"
team = "parcels"
trained = 2025-01-15

[[person]]
id = "s2"
name = "Timo Supervisor"
role = "supervisor"
team = "telesales"
trained = 2025-01-15

[[person]]
id = "s3"
name = "Untrained Supervisor"
role = "supervisor"
team = "parcels"

[[person]]
id = "ad"
name = "Anna Admin"
role = "admin"
trained = 2025-02-01

[[person]]
id = "po"
name = "Pekka Privacy"
role = "privacy_officer"
trained = 2025-02-01
"""

LEAVER = """
[[person]]
id = "x9"
name = "Leaving Agent"
role = "agent"
team = "parcels"
supervisor = "s1"
trained = 2025-01-10
"""

CUSTOMER = "+358 40 123 4567"


@functools.cache
def opus_audio(seconds: float = 1.0) -> bytes:
    """A real Ogg/Opus stereo file (ffmpeg through pydub)."""
    tone = Sine(440).to_audio_segment(duration=seconds * 1000, volume=-12)
    stereo = tone.set_frame_rate(8000).set_channels(2)
    out = io.BytesIO()
    stereo.export(out, format="ogg", codec="libopus")
    return out.getvalue()


def employees_json(people: list[tuple[str, str, str | None]]) -> str:
    return json.dumps(
        [{"id": i, "name": n, "aor": "", "team": t, "joined_at": ""} for i, n, t in people]
    )


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@dataclass
class World:
    root: Path
    keys: Keys
    config: StoreConfig
    store: InProcessStore
    storage: Storage
    doc: dict[str, Any] = field(default_factory=dict)  # the store's TOML document
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        assert self.config.directory_file is not None
        return self.config.directory_file

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.store.address)

    @property
    def access_service(self) -> AccessService:
        service = self.store.server.access
        assert service is not None
        return service

    @functools.cached_property
    def access(self) -> apb_grpc.AccessStub:
        return apb_grpc.AccessStub(self.channel())

    def md(self, person: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[person]}"),)

    def issue(self, person: str) -> str:
        with self.storage.catalog.engine.begin() as conn:
            self.tokens[person] = tokens.create_token(conn, person, "test").token
        return self.tokens[person]

    def rewrite_directory(self, text: str) -> None:
        """Replace the file the way config management does (new inode)."""
        tmp = self.directory.with_name(".people.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.directory)

    def seed(
        self,
        people: list[tuple[str, str, str | None]],
        started_ms: int | None = None,
        number: str = CUSTOMER,
        protector: Protector | None = None,
        **changes: Any,
    ) -> str:
        """A recording through the vault and the catalog; returns its id."""
        rid = secrets.token_hex(16)
        audio = opus_audio()
        source = self.root / f"{rid}.src"
        source.write_bytes(audio)
        blob_key = self.storage.vault.store(rid, source, self.root)
        source.unlink()
        started = started_ms or now_ms() - 86_400_000
        customer = (protector or self.keys.protector()).protect(number)
        row = make_row(
            rid, blob_key, started + 30_000, employee_id=people[0][0],
            employee_name=people[0][1], employee_team=people[0][2],
            employees_json=employees_json(people), size=len(audio),
            sha256=hashlib.sha256(audio).hexdigest(), customer_masked=customer.masked,
            customer_digest=None, customer_digest_key_id=None,
            customer_tail_sealed=customer.tail_sealed, **changes,
        )  # fmt: skip
        assert self.storage.catalog.insert(row)
        return rid

    def upload(
        self, started_ms: int, number: str, protector: Protector, seconds: float = 30.0
    ) -> str:
        """A recording through the real Ingest service; returns its id."""
        rid = secrets.token_hex(16)
        audio = opus_audio()
        c = protector.protect(number)
        manifest = pb.Manifest(
            recording_id=rid, site="hel-1", source="siprec", call_ref="c" * 16,
            direction=pb.DIRECTION_INBOUND, started_at=timestamp(from_ms(started_ms)),
            ended_at=timestamp(from_ms(started_ms + int(seconds * 1000))),
            service_number="+3581005577",
            customer=pb.Customer(kind=c.kind.value, masked=c.masked,
                                 tail_sealed=c.tail_sealed or ""),
            employees=[pb.Employee(id="a1", name="Aino Agent", aor="sip:1001@pbx",
                                   team="parcels", joined_at=timestamp(from_ms(started_ms)))],
            audio_format="opus", size=len(audio), sha256=hashlib.sha256(audio).hexdigest(),
            channels=2, region="fi",
        )  # fmt: skip
        requests = [
            pb.UploadRequest(manifest=manifest),
            pb.UploadRequest(chunk=pb.Chunk(offset=0, data=audio)),
            pb.UploadRequest(finish=pb.Finish(size=manifest.size, sha256=manifest.sha256)),
        ]
        receipt = pb_grpc.IngestStub(self.channel()).Upload(iter(requests), timeout=30)
        assert receipt.recording_id == rid
        return rid

    def head_seq(self) -> int:
        with self.storage.catalog.engine.connect() as conn:
            return int(conn.execute(sa.select(audit_head.c.seq)).scalar_one())

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        query = sa.select(audit_events).where(audit_events.c.seq > seq).order_by("seq")
        with self.storage.catalog.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def store_doc(root: Path, keys: Keys, seal: Path | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "store": {
            "listen": "127.0.0.1:0",
            "data_dir": str(root / "store-data"),
            "tls": {"insecure": True},
            "directory_file": str(root / "people.toml"),
            "seal_key_file": str(seal or keys.seal_private),
            **extra,
        }
    }


def running_world(
    root: Path, keys: Keys, seal: Path | None = None, **extra: Any
) -> Generator[World, None, None]:
    """``extra``: more ``[store]`` keys (e.g. ``catalog`` for PostgreSQL)."""
    (root / "people.toml").write_text(PEOPLE + LEAVER)
    doc = store_doc(root, keys, seal, **extra)
    with InProcessStore(store_config_from_dict(doc, root)) as store:
        storage = open_storage(store.config)
        world = World(root, keys, store.config, store, storage, doc)
        for person in ("a1", "a2", "a3", "s1", "s2", "s3", "ad", "po", "x9"):
            world.issue(person)
        try:
            yield world
        finally:
            storage.catalog.close()


def at_ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000)
