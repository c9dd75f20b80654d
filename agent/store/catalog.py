"""The catalog: one row per stored recording, through SQLAlchemy Core.

SQLite is the embedded default; PostgreSQL takes the same statements. Times are UTC
milliseconds since the epoch (exact, and the same on both engines).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

metadata = sa.MetaData()

recordings = sa.Table(
    "recordings",
    metadata,
    sa.Column("recording_id", sa.String(32), primary_key=True),
    sa.Column("site", sa.String(63), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("call_ref", sa.String(64), nullable=False),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("started_at_ms", sa.BigInteger, nullable=False),
    sa.Column("ended_at_ms", sa.BigInteger, nullable=False),
    sa.Column("service_number", sa.String(32), nullable=True),
    sa.Column("customer_kind", sa.String(16), nullable=False),
    sa.Column("customer_masked", sa.String(32), nullable=False),
    sa.Column("customer_digest", sa.String(64), nullable=True),
    sa.Column("customer_digest_key_id", sa.String(32), nullable=True),
    sa.Column("customer_tail_sealed", sa.Text, nullable=True),
    sa.Column("employee_id", sa.String(64), nullable=False),
    sa.Column("employee_name", sa.String(200), nullable=False),
    sa.Column("employee_team", sa.String(64), nullable=True),
    sa.Column("employees_json", sa.Text, nullable=False),
    sa.Column("flags", sa.String(400), nullable=False),
    sa.Column("audio_format", sa.String(8), nullable=False),
    sa.Column("channels", sa.Integer, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("blob_key", sa.String(200), nullable=False),
    sa.Column("region", sa.String(32), nullable=False),
    sa.Column("stored_at_ms", sa.BigInteger, nullable=False),
    sa.Column("legal_hold", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("restricted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_recordings_started", "started_at_ms"),
    sa.Index("ix_recordings_ended", "ended_at_ms"),
    sa.Index("ix_recordings_employee", "employee_id", "started_at_ms"),
    sa.Index("ix_recordings_team", "employee_team", "started_at_ms"),
    sa.Index("ix_recordings_digest", "customer_digest", "started_at_ms"),
)


def to_ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000 + (0.5 if moment.timestamp() >= 0 else -0.5))


def now_ms() -> int:
    return to_ms(dt.datetime.now(dt.UTC))


def from_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


@dataclass(frozen=True)
class RecordingRow:
    recording_id: str
    site: str
    source: str
    call_ref: str
    direction: str
    started_at_ms: int
    ended_at_ms: int
    service_number: str | None
    customer_kind: str
    customer_masked: str
    customer_digest: str | None
    customer_digest_key_id: str | None
    customer_tail_sealed: str | None
    employee_id: str
    employee_name: str
    employee_team: str | None
    employees_json: str
    flags: str
    audio_format: str
    channels: int
    size: int
    sha256: str
    blob_key: str
    region: str
    stored_at_ms: int
    legal_hold: bool = False
    restricted: bool = False

    @property
    def duration_ms(self) -> int:
        return self.ended_at_ms - self.started_at_ms

    @property
    def employees(self) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = json.loads(self.employees_json)
        return value


class Catalog:
    """The recordings table on SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def insert(self, row: RecordingRow) -> bool:
        """Insert once; returns False when the recording id is already there."""
        values = row.__dict__
        dialect = self.engine.dialect.name
        insert: Any = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(recordings)
        stmt = insert.values(**values).on_conflict_do_nothing(index_elements=["recording_id"])
        with self.engine.begin() as conn:
            result = conn.execute(stmt)
            return bool(result.rowcount)

    def get(self, recording_id: str) -> RecordingRow | None:
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(recordings).where(recordings.c.recording_id == recording_id)
            ).first()
        return RecordingRow(**found._mapping) if found else None

    def list(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 100,
    ) -> Sequence[RecordingRow]:
        query = sa.select(recordings).order_by(recordings.c.started_at_ms.desc()).limit(limit)
        if since_ms is not None:
            query = query.where(recordings.c.started_at_ms >= since_ms)
        if until_ms is not None:
            query = query.where(recordings.c.started_at_ms < until_ms)
        with self.engine.connect() as conn:
            return [RecordingRow(**r._mapping) for r in conn.execute(query)]


def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
