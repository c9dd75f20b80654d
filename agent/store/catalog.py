"""The catalog: one row per stored recording, through SQLAlchemy Core.

SQLite is the embedded default; PostgreSQL takes the same statements. Times are UTC
milliseconds since the epoch (exact, and the same on both engines). The schema is made
by the Alembic migrations in ``agent/store/migrations`` (``Catalog.migrate()``); the
tables below describe it for queries and must match the newest migration.

Tables: ``recordings`` (one row per stored recording; a row exists only after its blob
does), ``data_keys`` (each blob's wrapped data key; written before the blob, so every
blob has one; ``wrapped_key`` NULL means crypto-shredded), and ``audit_events``
(defined in ``agent.store.audit.chain``), and ``master_keys`` (the master keys this catalog
knows, with check values: one key set for every store on the catalog).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.dialects import postgresql, sqlite

from agent import logs

log = logs.get_logger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
FIRST_REVISION = "0001"

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
    # Always NULL since migration 0005 (digests made on agent hosts were removed).
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
    # Set when the recording is being destroyed ("retention" or "erasure"); the row
    # goes only after its key and blob, so a marked row is half-done work.
    sa.Column("destroy_reason", sa.String(16), nullable=True),
    sa.Column("destroy_marked_at_ms", sa.BigInteger, nullable=True),
    # Intervals written as silence: [{"start", "end", "who"}] (migration 0008_control).
    sa.Column("pauses_json", sa.Text, nullable=True),
    sa.Index("ix_recordings_started", "started_at_ms"),
    sa.Index("ix_recordings_ended", "ended_at_ms"),
    sa.Index("ix_recordings_employee", "employee_id", "started_at_ms"),
    sa.Index("ix_recordings_team", "employee_team", "started_at_ms"),
    sa.Index("ix_recordings_masked", "customer_masked", "started_at_ms"),
    sa.Index("ix_recordings_blob_key", "blob_key", unique=True),
    # Only the rows being destroyed (the sweeper's resume; migration 0004).
    sa.Index(
        "ix_recordings_destroying",
        "recording_id",
        sqlite_where=sa.text("destroy_reason IS NOT NULL"),
        postgresql_where=sa.text("destroy_reason IS NOT NULL"),
    ),
)

data_keys = sa.Table(
    "data_keys",
    metadata,
    sa.Column("blob_key", sa.String(200), primary_key=True),
    sa.Column("recording_id", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("shredded_at_ms", sa.BigInteger, nullable=True),
    sa.Index("ix_data_keys_recording", "recording_id"),
    sa.Index("ix_data_keys_created", "created_at_ms"),
)


master_keys = sa.Table(
    "master_keys",
    metadata,
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("check_value", sa.LargeBinary, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("retired_at_ms", sa.BigInteger, nullable=True),
)


# Live upload (migration 0007, agent.store.live.segments): calls streamed while they run.
live_recordings = sa.Table(
    "live_recordings",
    metadata,
    sa.Column("recording_id", sa.String(32), primary_key=True),
    sa.Column("site", sa.String(63), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # "live", "finished"
    sa.Column("manifest_json", sa.Text, nullable=False),
    sa.Column("final_json", sa.Text, nullable=True),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("last_append_ms", sa.BigInteger, nullable=False),
    sa.Column("claimed_until_ms", sa.BigInteger, nullable=True),
    # how the legs arrived: "alaw" or "pcm_s16le" (agent.g711; migration 0009)
    sa.Column("encoding", sa.String(16), nullable=False, server_default="pcm_s16le"),
    sa.Index("ix_live_state", "state", "last_append_ms"),
    sa.Index("ix_live_site", "site"),
)

live_segments = sa.Table(
    "live_segments",
    metadata,
    sa.Column("recording_id", sa.String(32), primary_key=True),
    sa.Column("leg", sa.String(16), primary_key=True),
    sa.Column("offset", sa.BigInteger, primary_key=True),
    sa.Column("length", sa.Integer, nullable=False),
    sa.Column("blob_key", sa.String(200), nullable=False),
    sa.Column("blob_at", sa.BigInteger, nullable=False),  # where in the blob (ciphertext)
    sa.Column("blob_length", sa.Integer, nullable=False),
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
    destroy_reason: str | None = None
    destroy_marked_at_ms: int | None = None
    pauses_json: str | None = None

    @property
    def pauses(self) -> list[dict[str, Any]]:
        """Intervals written as silence (start, end ISO-8601 UTC; who asked)."""
        value: list[dict[str, Any]] = json.loads(self.pauses_json or "[]")
        return value

    @property
    def duration_ms(self) -> int:
        return self.ended_at_ms - self.started_at_ms

    @property
    def employees(self) -> list[dict[str, Any]]:
        value: list[dict[str, Any]] = json.loads(self.employees_json)
        return value


class Catalog:
    """The catalog on SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: an error's text (logged, or sent back) never carries the row's values
        self.engine = sa.create_engine(
            url, pool_pre_ping=url.startswith("postgresql"), hide_parameters=True
        )
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        """Bring the schema to the newest migration; safe to call from several
        processes at once (an advisory lock on PostgreSQL, a file lock on SQLite)."""
        with self._migration_lock(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7061727)"))
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            tables = set(sa.inspect(conn).get_table_names())
            if "recordings" in tables and "alembic_version" not in tables:
                # A catalog made by create_all before migrations existed.
                command.stamp(cfg, FIRST_REVISION)
            command.upgrade(cfg, "head")

    create_schema = migrate

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self.dialect != "sqlite" or not self.url.startswith("sqlite:///"):
            yield
            return
        lock_path = Path(self.url.removeprefix("sqlite:///") + ".migrate.lock")
        with lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def serialised(self) -> Iterator[sa.Connection]:
        """A transaction that no other process runs at the same time (the migration
        lock): for the few read-decide-write steps that must not interleave across
        store replicas, such as registering master keys."""
        with self._migration_lock(), self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7061728)"))
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    def skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """``FOR UPDATE SKIP LOCKED`` where the engine has it (PostgreSQL). SQLite runs
        one writer at a time, so its statements need no row locks."""
        if self.dialect == "postgresql":
            return query.with_for_update(skip_locked=True)
        return query

    def insert(self, row: RecordingRow) -> bool:
        """Insert once; returns False when the recording id is already there."""
        with self.engine.begin() as conn:
            return conn.execute(self.insert_statement(row)).first() is not None

    def insert_statement(self, row: RecordingRow) -> Any:
        """The insert of ``insert``, for a caller's own transaction (the vault's)."""
        insert: Any = (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(
            recordings
        )
        return (
            insert.values(**asdict(row))
            .on_conflict_do_nothing(index_elements=["recording_id"])
            .returning(recordings.c.recording_id)
        )  # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING

    def get(self, recording_id: str) -> RecordingRow | None:
        """The row, also while it is being destroyed (``destroy_reason`` set)."""
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
        """Recordings by start time, newest first; those being destroyed are left out."""
        query = (
            sa.select(recordings)
            .where(recordings.c.destroy_reason.is_(None))
            .order_by(recordings.c.started_at_ms.desc())
            .limit(limit)
        )
        if since_ms is not None:
            query = query.where(recordings.c.started_at_ms >= since_ms)
        if until_ms is not None:
            query = query.where(recordings.c.started_at_ms < until_ms)
        with self.engine.connect() as conn:
            return [RecordingRow(**r._mapping) for r in conn.execute(query)]

    def set_legal_hold(self, recording_id: str, hold: bool) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(recordings)
                .where(recordings.c.recording_id == recording_id)
                .values(legal_hold=hold)
                .returning(recordings.c.recording_id)
            )
            return result.first() is not None


def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=5000")
    # 64 MiB of page cache per connection (the default is 2 MiB): at a million
    # recordings the sweeper's deletes touch index pages all over the file
    # (tests/bench/store_scale.py).
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
