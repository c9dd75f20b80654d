"""The hash-chained audit log on SQLite and on a real PostgreSQL: the database refuses
edits, and when someone with the owner's rights edits, removes or reorders entries
anyway, `callrec audit verify` names the first bad one."""

# Fixtures are imported from tests.support.services; test arguments name them.

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from agent.cli import access as access_cli
from agent.store.audit import chain as audit
from agent.store.catalog import MIGRATIONS, Catalog
from tests.support.services import Postgres, postgres, write_store_toml  # noqa: F401 (fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    else:
        pg: Postgres = request.getfixturevalue("postgres")
        url = pg.new_database()
    cat = Catalog(url)
    cat.migrate()
    yield cat
    cat.close()


def fill(catalog: Catalog, count: int = 6) -> None:
    with catalog.engine.begin() as conn:
        for n in range(1, count + 1):
            audit.append(conn, f"person:p{n}", "play", f"{n:032x}", "case 1", "allowed",
                         purpose="verification", detail=f"n={n}")  # fmt: skip


def tamper(catalog: Catalog, *statements: str) -> None:
    """Run SQL with the append-only triggers off, as the database owner could."""
    with catalog.engine.begin() as conn:
        if catalog.dialect == "postgresql":
            conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
        else:
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
        for statement in statements:
            conn.exec_driver_sql(statement)


CASES: dict[str, tuple[Callable[[Catalog], list[str]], int, str]] = {
    "edited": (lambda c: ["UPDATE audit_events SET reason = 'nothing' WHERE seq = 3"], 3,
               "content was changed"),
    "edited_and_rehashed": (
        lambda c: ["UPDATE audit_events SET actor = 'person:nobody' WHERE seq = 3",
                   f"UPDATE audit_events SET entry_hash = '{rehash_after_edit(c)}' WHERE seq = 3"],
        4, "does not follow entry seq=3"),
    "removed": (lambda c: ["DELETE FROM audit_events WHERE seq = 4"], 4, "seq=4 is missing"),
    "removed_from_the_end": (lambda c: ["DELETE FROM audit_events WHERE seq >= 5"], 5,
                             "removed from the end"),
    "reordered": (lambda c: ["UPDATE audit_events SET seq = -2 WHERE seq = 2",
                             "UPDATE audit_events SET seq = 2 WHERE seq = 5",
                             "UPDATE audit_events SET seq = 5 WHERE seq = -2"], 2,
                  "does not follow entry seq=1"),
}  # fmt: skip


def rehash_after_edit(catalog: Catalog) -> str:
    with catalog.engine.connect() as conn:
        row = conn.execute(sa.select(audit.audit_events).where(audit.audit_events.c.seq == 3))
        values = dict(row.one()._mapping)
    values["actor"] = "person:nobody"
    return audit.entry_hash(values)


@pytest.mark.parametrize("case", CASES)
def test_verify_names_the_first_bad_entry(catalog: Catalog, case: str) -> None:
    fill(catalog)
    assert audit.verify(catalog).ok
    statements, bad_seq, message = CASES[case]
    tamper(catalog, *statements(catalog))
    verdict = audit.verify(catalog)
    assert not verdict.ok
    assert verdict.bad_seq == bad_seq, verdict.problem
    assert message in verdict.problem


def test_the_database_refuses_update_and_delete(catalog: Catalog) -> None:
    fill(catalog, 2)
    for statement in ("UPDATE audit_events SET reason = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), catalog.engine.begin() as conn:
            conn.exec_driver_sql(statement)
    assert audit.verify(catalog).entries == 2


def test_concurrent_appends_make_one_chain(catalog: Catalog) -> None:
    def writer(n: int) -> None:
        for i in range(15):
            with catalog.engine.begin() as conn:
                audit.append(conn, f"writer:{n}", "search", None, "", "allowed", detail=str(i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    verdict = audit.verify(catalog)
    assert verdict.ok and verdict.entries == 60, verdict.problem


def test_a_batch_of_events_is_the_chain_that_single_appends_make(catalog: Catalog) -> None:
    events = [audit.Event(f"system:s{n}", "destroy", f"{n:032x}", "retention", "destroyed")
              for n in range(5)]  # fmt: skip
    with catalog.engine.begin() as conn:
        audit.append(conn, "person:p0", "search", None, "", "allowed", at_ms=7)
        assert audit.append_events(conn, events, at_ms=7) == [2, 3, 4, 5, 6]
        assert audit.append_events(conn, []) == []
        audit.append(conn, "person:p1", "search", None, "", "allowed", at_ms=7)
    with catalog.engine.connect() as conn:
        batched = [r.entry_hash for r in conn.execute(sa.select(audit.audit_events))]
    verdict = audit.verify(catalog)
    assert verdict.ok and verdict.entries == 7, verdict.problem
    # The same events appended one at a time give the same hashes.
    prev, expected = audit.GENESIS, []
    for seq, values in enumerate(
        [{"actor": "person:p0", "action": "search", "recording_id": None, "reason": "",
          "outcome": "allowed"},
         *({"actor": e.actor, "action": e.action, "recording_id": e.recording_id,
            "reason": e.reason, "outcome": e.outcome} for e in events),
         {"actor": "person:p1", "action": "search", "recording_id": None, "reason": "",
          "outcome": "allowed"}], 1,
    ):  # fmt: skip
        prev = audit.entry_hash(
            {**values, "seq": seq, "at_ms": 7, "purpose": "", "detail": "", "prev_hash": prev}
        )
        expected.append(prev)
    assert sorted(batched) == sorted(expected)
    assert verdict.head_hash == expected[-1]


def test_migration_chains_the_entries_written_before_it(tmp_path: Path) -> None:
    cat = Catalog(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with cat.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        for n in range(3):
            conn.exec_driver_sql(
                "INSERT INTO audit_events (at_ms, actor, action, recording_id, reason, outcome) "
                f"VALUES ({n}, 'system:sweeper', 'destroy', '{n:032x}', 'retention', 'destroyed')"
            )
    cat.migrate()
    with cat.engine.begin() as conn:
        audit.append(conn, "person:po", "erase", "f" * 32, "case", "allowed", purpose="legal")
    verdict = audit.verify(cat)
    assert verdict.ok and verdict.entries == 4
    cat.close()


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_store_toml(
        tmp_path / "store.toml", {"listen": "127.0.0.1:0", "data_dir": str(tmp_path / "data")}
    )
    cat = Catalog(f"sqlite:///{tmp_path / 'data' / 'catalog.sqlite3'}")
    cat.migrate()
    fill(cat)
    parser = argparse.ArgumentParser(prog="callrec")
    access_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "verify", "--config", str(config)])
    assert access_cli.dispatch(args) == 0
    assert "audit log ok: 6 entries" in capsys.readouterr().out
    tamper(cat, "UPDATE audit_events SET outcome = 'denied' WHERE seq = 5")
    assert access_cli.dispatch(args) == 1
    out = capsys.readouterr().out
    assert "BROKEN after 4 good entries: entry seq=5" in out and "changed" in out
    cat.close()
