"""Manifests an agent (or anyone with its certificate) could send to get bad data into
the catalog, through the real Ingest service: each is refused with INVALID_ARGUMENT
(FAILED_PRECONDITION for a time ahead of the store's clock) naming the field, before
anything is written (no part, no key, no blob, no row)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable

import grpc
import pytest
import sqlalchemy as sa

from agent.capture import new_recording_id, utc_now
from agent.manifest import masked_is_plausible
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.store.catalog import Catalog, data_keys, recordings
from tests.support.stack import InProcessStore

DATA = os.urandom(20_000)


def good_manifest() -> pb.Manifest:
    now = utc_now()
    manifest = pb.Manifest(
        recording_id=new_recording_id(), site="hel-1", source="siprec", call_ref="c" * 16,
        direction=pb.DIRECTION_INBOUND, audio_format="wav", size=len(DATA),
        sha256=hashlib.sha256(DATA).hexdigest(), channels=2, region="fi",
        service_number="+3581005577",
        customer=pb.Customer(kind="number", masked="+358401234***", digest="d" * 64,
                             digest_key_id="k1", tail_sealed="sealed-tail"),
        employees=[pb.Employee(id="e1001", name="Aino Virtanen", aor="sip:1001@pbx",
                               team="parcels")],
    )  # fmt: skip
    manifest.started_at.FromDatetime(now - dt.timedelta(minutes=5))
    manifest.ended_at.FromDatetime(now)
    manifest.employees[0].joined_at.FromDatetime(now - dt.timedelta(minutes=5))
    return manifest


def _at(m: pb.Manifest, field: str, moment: dt.datetime) -> None:
    getattr(m, field).FromDatetime(moment)


NOW = dt.datetime.now(dt.UTC)


def _a_day_ahead(m: pb.Manifest) -> None:
    _at(m, "started_at", NOW + dt.timedelta(days=1))
    _at(m, "ended_at", NOW + dt.timedelta(days=1, minutes=5))


Change = Callable[[pb.Manifest], None]
HOLES: dict[str, tuple[Change, str]] = {
    "full number plus ***": (lambda m: setattr(m.customer, "masked", "+358401234567***"),
                             "customer.masked"),
    "US full number plus ***": (lambda m: setattr(m.customer, "masked", "+12025550123***"),
                                "customer.masked"),
    "ended in 9999": (lambda m: _at(m, "ended_at", dt.datetime(9999, 1, 1, tzinfo=dt.UTC)),
                      "ended_at"),
    "agent clock a day ahead": (_a_day_ahead, "started_at"),
    "a call of three days": (lambda m: _at(m, "started_at", NOW - dt.timedelta(days=3)),
                             "ended_at"),
    "started at the epoch": (lambda m: setattr(m.started_at, "seconds", 0), "started_at"),
    "time past year 9999": (lambda m: setattr(m.ended_at, "seconds", 10**12), "ended_at"),
    "negative nanos": (lambda m: setattr(m.ended_at, "nanos", -5), "ended_at"),
    "joined_at out of range": (lambda m: setattr(m.employees[0].joined_at, "seconds", -10**13),
                               "joined_at"),
    "id with a trailing newline": (lambda m: setattr(m, "recording_id", m.recording_id[:31] + "\n"),
                                   "recording_id"),
    "id of 32 digits and a newline": (lambda m: setattr(m, "recording_id", m.recording_id + "\n"),
                                      "recording_id"),
    "masked with a newline": (lambda m: setattr(m.customer, "masked", "+358401234***\n"),
                              "customer.masked"),
    "service number with a newline": (lambda m: setattr(m, "service_number", "+3581005577\n"),
                                      "service_number"),
    "site with a newline": (lambda m: setattr(m, "site", "hel-1\n"), "site"),
    "call_ref of 300 kB": (lambda m: setattr(m, "call_ref", "c" * 300_000), "call_ref"),
    "employee name of 300 kB": (lambda m: setattr(m.employees[0], "name", "n" * 300_000),
                                "employees"),
    "employee aor of 300 kB": (lambda m: setattr(m.employees[0], "aor", "a" * 300_000),
                               "employees"),
    "sealed tail of 300 kB": (lambda m: setattr(m.customer, "tail_sealed", "s" * 300_000),
                              "customer"),
    "a thousand flags": (lambda m: m.flags.extend(["silent_channel"] * 1000), "flags"),
    "unknown direction": (lambda m: setattr(m, "direction", 77), "direction"),
}  # fmt: skip


def _upload(store: InProcessStore, manifest: pb.Manifest) -> pb.UploadReceipt:
    requests = [
        pb.UploadRequest(manifest=manifest),
        pb.UploadRequest(chunk=pb.Chunk(offset=0, data=DATA)),
        pb.UploadRequest(finish=pb.Finish(size=manifest.size, sha256=manifest.sha256)),
    ]
    stub = pb_grpc.IngestStub(grpc.insecure_channel(store.address))
    receipt: pb.UploadReceipt = stub.Upload(iter(requests), timeout=20)
    return receipt


def _nothing_written(store: InProcessStore) -> None:
    assert list(store.config.incoming_dir.iterdir()) == []
    catalog = Catalog(store.config.catalog_url)
    try:
        with catalog.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(data_keys)).scalar() == 0
            assert conn.execute(sa.select(sa.func.count()).select_from(recordings)).scalar() == 0
    finally:
        catalog.close()
    blobs = store.config.blobs_dir
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))


@pytest.mark.parametrize("hole", HOLES)
def test_each_hole_is_refused_before_anything_is_written(store: InProcessStore, hole: str) -> None:
    change, field = HOLES[hole]
    manifest = good_manifest()
    change(manifest)
    with pytest.raises(grpc.RpcError) as err:
        _upload(store, manifest)
    # A time ahead of the store's clock may be the agent's clock: FAILED_PRECONDITION
    # keeps the recording in the agent's outbox (retried); the rest is quarantined.
    expected = (
        grpc.StatusCode.FAILED_PRECONDITION
        if hole in ("ended in 9999", "agent clock a day ahead")
        else grpc.StatusCode.INVALID_ARGUMENT
    )
    assert err.value.code() == expected, err.value.details()
    assert field in (err.value.details() or ""), err.value.details()
    assert len(err.value.details() or "") < 400
    _nothing_written(store)


def test_a_good_manifest_is_stored(store: InProcessStore) -> None:
    manifest = good_manifest()
    assert _upload(store, manifest).sha256 == manifest.sha256


@pytest.mark.parametrize(
    "masked",
    ["+358401234***", "+35898765***", "+12025550***", "+44207946***", "+46701234***",
     "+3581005***", "+49301234***"],
)  # fmt: skip
def test_real_masked_numbers_stay_plausible(masked: str) -> None:
    assert masked_is_plausible(masked)
