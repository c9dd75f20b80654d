"""The catalog: the same bodies on SQLite and on a real PostgreSQL (started here)."""

# Fixtures are imported from tests.support.services; test arguments name them.
# ruff: noqa: F811

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from agent.store.audit import chain as audit
from agent.store.catalog import (
    MIGRATIONS,
    Catalog,
    RecordingRow,
    data_keys,
    metadata,
    recordings,
)
from tests.support.services import Backend, backend, distributed, make_row, postgres, seaweed  # noqa: F401 (fixtures)

SEARCH_INDEXES = {
    "ix_recordings_started",
    "ix_recordings_ended",
    "ix_recordings_employee",
    "ix_recordings_team",
    "ix_recordings_masked",
}


def sample_row(n: int, **changes: object) -> RecordingRow:
    ended = 1_700_000_000_000 + n * 60_000 + 30_000
    return make_row(f"{n:032x}", f"{n:032x}-0000", ended, **changes)


@pytest.fixture
def catalog(backend: Backend) -> Iterator[Catalog]:
    cat = Catalog(backend.config().catalog_url)
    cat.migrate()
    yield cat
    cat.close()


def test_migrations_build_exactly_the_declared_schema(catalog: Catalog) -> None:
    catalog.migrate()  # a second run is a no-op
    assert audit.audit_events.name in metadata.tables
    with catalog.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == ScriptDirectory(str(MIGRATIONS)).get_current_head()
    indexes = {ix["name"] for ix in sa.inspect(catalog.engine).get_indexes("recordings")}
    assert SEARCH_INDEXES | {"ix_recordings_blob_key", "ix_recordings_destroying"} <= indexes


def test_insert_is_once_and_get_returns_the_row(catalog: Catalog) -> None:
    row = sample_row(1)
    assert catalog.insert(row) is True
    assert catalog.insert(sample_row(1, size=5)) is False
    stored = catalog.get(row.recording_id)
    assert stored == row
    assert stored is not None and stored.duration_ms == 30_000
    assert catalog.get("f" * 32) is None


def test_list_is_newest_first_in_a_time_range_without_rows_being_destroyed(
    catalog: Catalog,
) -> None:
    for n in range(1, 6):
        catalog.insert(sample_row(n))
    with catalog.engine.begin() as conn:
        conn.execute(
            sa.update(recordings)
            .where(recordings.c.recording_id == f"{4:032x}")
            .values(destroy_reason="retention", destroy_marked_at_ms=1)
        )
    listed = catalog.list(since_ms=sample_row(2).started_at_ms, limit=10)
    assert [r.recording_id for r in listed] == [f"{n:032x}" for n in (5, 3, 2)]
    assert len(catalog.list(limit=2)) == 2


def test_legal_hold_is_kept(catalog: Catalog) -> None:
    catalog.insert(sample_row(7))
    assert catalog.set_legal_hold(f"{7:032x}", True)
    stored = catalog.get(f"{7:032x}")
    assert stored is not None and stored.legal_hold is True
    assert not catalog.set_legal_hold("0" * 31 + "f", True)


def test_concurrent_first_migrations_do_not_collide(backend: Backend) -> None:
    url = backend.config().catalog_url
    errors: list[BaseException] = []

    def migrate() -> None:
        cat = Catalog(url)
        try:
            cat.migrate()
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
        finally:
            cat.close()

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_catalog_made_before_migrations_is_adopted(backend: Backend) -> None:
    """The first store made its table with create_all; migrate() stamps and upgrades."""
    cat = Catalog(backend.config().catalog_url)
    legacy = sa.MetaData()
    columns = [
        sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
        for c in recordings.columns
        if not c.name.startswith("destroy") and c.name != "pauses_json"  # later migrations
    ]
    sa.Table("recordings", legacy, *columns)
    legacy.create_all(cat.engine)
    cat.migrate()
    assert cat.insert(sample_row(3))
    assert {c["name"] for c in sa.inspect(cat.engine).get_columns("recordings")} >= {
        "destroy_reason",
        "destroy_marked_at_ms",
    }
    assert sa.inspect(cat.engine).has_table(data_keys.name)
    cat.close()


def test_skip_locked_leaves_rows_another_sweeper_holds(distributed: Backend) -> None:
    cat = Catalog(distributed.config().catalog_url)
    cat.migrate()
    for n in range(1, 5):
        cat.insert(sample_row(n))
    query = cat.skip_locked(
        sa.select(recordings.c.recording_id).order_by(recordings.c.recording_id).limit(2)
    )
    with cat.engine.begin() as first:
        held = [r for (r,) in first.execute(query)]
        with cat.engine.begin() as second:
            other = [r for (r,) in second.execute(query)]
    assert held == [f"{1:032x}", f"{2:032x}"]
    assert other == [f"{3:032x}", f"{4:032x}"]
    cat.close()


def test_skip_locked_compiles_away_on_sqlite(tmp_path: object) -> None:
    cat = Catalog("sqlite:///" + str(tmp_path) + "/c.sqlite3")
    sql = str(cat.skip_locked(sa.select(recordings.c.recording_id)).compile(cat.engine))
    assert "FOR UPDATE" not in sql
    cat.close()


def test_a_database_error_logs_no_value_of_the_row(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy's error text carries the bound parameters and PostgreSQL's DETAIL the
    failing row: neither reaches a log line."""
    from agent import logs

    ended = 1_700_000_000_000
    catalog.insert(make_row("1" * 32, "blob-key-1", ended, customer_tail_sealed="SEALED-TAIL-1"))
    duplicate = make_row("2" * 32, "blob-key-1", ended, customer_tail_sealed="SEALED-TAIL-2")
    missing = sample_row(3, customer_tail_sealed="SEALED-TAIL-3", employee_id=None)
    caplog.set_level("ERROR")
    for row in (duplicate, missing):
        with pytest.raises(sa.exc.IntegrityError) as raised:
            catalog.insert(row)
        assert "hidden due to hide_parameters" in str(raised.value)
        try:
            raise raised.value
        except sa.exc.IntegrityError:
            logs.get_logger("agent.store.test").exception("insert_failed")
    assert caplog.text.count("event=insert_failed error=") == 2
    assert "IntegrityError" in caplog.text
    for value in ("SEALED-TAIL", "Aino Virtanen", "blob-key-1", "+358401234", "e1001"):
        assert value not in caplog.text, caplog.text
