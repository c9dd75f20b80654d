"""The people's port under bad input and internal failures, against the real store on
SQLite + files and on PostgreSQL + SeaweedFS (S3): unauthenticated requests with huge
ids grow neither the audit table nor the log, internal errors reach the client as a
status and a generic message (never SQL), and a play is audited as allowed only once
the audio can be served."""

# Fixtures are imported from tests.support.services; test arguments name them.
# ruff: noqa: F811

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from agent.pb.callrec.v1 import access_pb2 as apb
from agent.store.access.throttle import FailureThrottle
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, data_keys
from tests.support.access_world import World, opus_audio, running_world
from tests.support.services import Backend, backend, postgres, seaweed  # noqa: F401
from tests.support.stack import make_keys

HUGE_ID = "x" * 200_000
AINO_PEOPLE: list[tuple[str, str, str | None]] = [("a1", "Aino Agent", "parcels")]
SQL_WORDS = ("sqlalchemy", "INSERT", "SELECT", "psycopg", "sqlite3", "Traceback", "Unexpected")


@pytest.fixture
def world(backend: Backend, tmp_path: Path) -> Iterator[World]:
    extra = {k: v for k, v in backend.doc["store"].items() if k in ("catalog", "blobs", "s3")}
    yield from running_world(tmp_path, make_keys(tmp_path / "keys"), **extra)


def _request(
    rid: str, purpose: apb.Purpose.ValueType = apb.PURPOSE_VERIFICATION
) -> apb.RecordingRequest:
    return apb.RecordingRequest(recording_id=rid, purpose=purpose, reason="case 7")


def _bounded(event: dict[str, object]) -> bool:
    limits = {c.name: c.type.length for c in audit.audit_events.c if hasattr(c.type, "length")}
    return all(
        value is None or not isinstance(value, str) or len(value) <= (limits.get(k) or 10**9)
        for k, value in event.items()
    )


def test_unauthenticated_flood_writes_one_bounded_entry_a_minute(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    world.access_service.trail.throttle = FailureThrottle(window_s=1.0)
    before = world.head_seq()
    for n in range(30):
        md = () if n % 2 else (("authorization", "Bearer " + "y" * 6000),)
        with pytest.raises(grpc.RpcError) as err:
            world.access.GetRecording(_request(HUGE_ID), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not any(word in (err.value.details() or "") for word in SQL_WORDS)
    events = world.events_after(before)
    assert len(events) == 1, events
    assert events[0]["outcome"] == "unauthenticated" and events[0]["recording_id"] is None
    assert "source=127.0.0.1" in events[0]["detail"]
    assert all(_bounded(e) for e in events)
    assert max(len(r.getMessage()) for r in caplog.records) < 2_000
    assert sum(len(r.getMessage()) for r in caplog.records) < 20_000

    time.sleep(1.2)  # the window ends: the next failure brings its count
    with pytest.raises(grpc.RpcError):
        world.access.Search(apb.SearchRequest(purpose=apb.PURPOSE_TRAINING), timeout=10)
    details = [e["detail"] for e in world.events_after(before)]
    assert any("repeats=29" in d for d in details), details
    assert audit.verify(world.storage.catalog).ok


def test_a_bad_id_from_a_known_person_is_refused_without_echoing_it(world: World) -> None:
    before = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        world.access.GetRecording(_request(HUGE_ID), metadata=world.md("a1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details() or "") < 300
    [event] = world.events_after(before)
    assert event["recording_id"] is None and event["outcome"] == "refused"
    assert _bounded(event)
    for bad in (HUGE_ID[:32], "0" * 31 + "A", "0" * 32 + "\n"):
        with pytest.raises(grpc.RpcError) as err:
            next(iter(world.access.Play(_request(bad), metadata=world.md("a1"), timeout=10)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unreadable_recording_is_data_loss_audited_as_error_not_allowed(world: World) -> None:
    rid = world.seed(AINO_PEOPLE)
    row = world.storage.catalog.get(rid)
    assert row is not None
    with world.storage.catalog.engine.begin() as conn:  # a damaged wrapped key
        conn.execute(
            sa.update(data_keys)
            .where(data_keys.c.blob_key == row.blob_key)
            .values(wrapped_key=os.urandom(60))
        )
    before = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        b"".join(c.data for c in world.access.Play(_request(rid), metadata=world.md("a1")))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "ref=" in (err.value.details() or "")
    assert "wrap" not in (err.value.details() or "").lower()
    outcomes = [(e["action"], e["outcome"]) for e in world.events_after(before)]
    assert outcomes == [("play", "error")]

    blob_gone = world.seed(AINO_PEOPLE)
    gone = world.storage.catalog.get(blob_gone)
    assert gone is not None
    world.storage.vault.blobs.delete(gone.blob_key)
    before = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        b"".join(c.data for c in world.access.Play(_request(blob_gone), metadata=world.md("a1")))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert gone.blob_key not in (err.value.details() or "")
    assert [e["outcome"] for e in world.events_after(before)] == ["error"]

    fine = world.seed(AINO_PEOPLE)  # a readable one is still allowed and served
    played = world.access.Play(_request(fine), metadata=world.md("a1"))
    assert b"".join(c.data for c in played) == opus_audio()


def test_a_catalog_failure_is_a_generic_status_never_sql(world: World) -> None:
    """The token table vanishes (a botched manual change): every request fails inside
    the store; the client gets a status and a reference, the audit log an ``error``."""
    with world.storage.catalog.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE access_tokens")
    before = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        world.access.Search(
            apb.SearchRequest(purpose=apb.PURPOSE_TRAINING), metadata=world.md("a1")
        )
    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    details = err.value.details() or ""
    assert "ref=" in details and not any(word in details for word in SQL_WORDS), details
    assert "access_tokens" not in details
    [event] = world.events_after(before)
    assert event["outcome"] == "error" and event["action"] == "search"


def test_counts_still_held_are_written_when_the_store_stops(
    backend: Backend, tmp_path: Path
) -> None:
    extra = {k: v for k, v in backend.doc["store"].items() if k in ("catalog", "blobs", "s3")}
    running = running_world(tmp_path, make_keys(tmp_path / "keys"), **extra)
    world = next(running)
    config = world.config
    for _ in range(5):
        with pytest.raises(grpc.RpcError):
            world.access.Search(apb.SearchRequest(purpose=apb.PURPOSE_TRAINING), timeout=10)
    running.close()  # the store stops within the minute
    catalog = Catalog(config.catalog_url)
    try:
        with catalog.engine.connect() as conn:
            details = [r.detail for r in conn.execute(sa.select(audit.audit_events))]
    finally:
        catalog.close()
    assert sum("repeats=4" in d for d in details) == 1, details
