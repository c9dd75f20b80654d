"""The agent's live uploader against a real store (in-process, port 0), without SIP:
a hung-up capture is finished at the store (tail, sizes and sha256 checked) and only
then deleted; while the store is unreachable the capture stays where it is and is
finished once the store answers again; an active capture is streamed from the
store's durable sizes without resending what the store holds; a call discarded
mid-call is told to the store as soon as it answers."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import grpc
import pytest

from agent.capture import iso_ms, read_meta, utc_now, write_meta
from agent.recorder.control.calls import discarded
from agent.recorder.uplink.live import LiveUplink
from agent.store.catalog import Catalog
from agent.store.ingest import discards
from agent.testcall.sipp import free_port
from tests.support.audio import probe
from tests.support.faults import write_capture
from tests.support.stack import InProcessStore, agent_config, make_keys, store_config
from tests.test_live_store import archive_audio, wait_stored

WIRE_SECOND = 8_000  # bytes of one leg per second on the wire (G.711 A-law)


def _uplink(tmp_path: Path, address: str) -> tuple[LiveUplink, Path]:
    keys = make_keys(tmp_path / "keys")
    config, _ = agent_config(tmp_path, keys, address, uplink={"live": True})
    return LiveUplink(config, grpc.insecure_channel(address)), config.data_dir


def test_a_hung_up_capture_is_finished_at_the_store_then_deleted(tmp_path: Path) -> None:
    with InProcessStore(store_config(tmp_path)) as store:
        live, data_dir = _uplink(tmp_path, store.address)
        rid = write_capture(data_dir, make_keys(tmp_path / "keys"), seconds=4)
        assert live.handles(rid)
        live.finish(rid)
        assert not (data_dir / "captures" / "ready" / rid).exists()
        row = wait_stored(store, rid)
        assert row.employee_name == "Aino Virtanen" and row.customer_masked == "+358401234***"
        channels, _, seconds = probe(archive_audio(store, row, tmp_path / "a.ogg"))
        assert channels == 2 and abs(seconds - 4.0) < 0.1
        assert live.bytes_sent == 2 * 4 * WIRE_SECOND


def test_store_unreachable_at_hang_up_keeps_the_capture_until_it_answers(tmp_path: Path) -> None:
    port = free_port()
    live, data_dir = _uplink(tmp_path, f"127.0.0.1:{port}")
    rid = write_capture(data_dir, make_keys(tmp_path / "keys"), seconds=3)
    live.finish(rid)  # nobody listens: returns, nothing lost
    assert (data_dir / "captures" / "ready" / rid / "customer.wav").exists()
    config = dataclasses.replace(store_config(tmp_path, listen=f"127.0.0.1:{port}"))
    with InProcessStore(config) as store:
        deadline = time.monotonic() + 30
        while (data_dir / "captures" / "ready" / rid).exists() and time.monotonic() < deadline:
            live.finish(rid)  # what the finalize queue's rescan does
            time.sleep(0.5)
        row = wait_stored(store, rid)
        assert abs(probe(archive_audio(store, row, tmp_path / "a.ogg"))[2] - 3.0) < 0.1


def test_an_active_capture_streams_from_the_stores_sizes(tmp_path: Path) -> None:
    with InProcessStore(store_config(tmp_path)) as store:
        live, data_dir = _uplink(tmp_path, store.address)
        rid = write_capture(data_dir, make_keys(tmp_path / "keys"), seconds=3)
        ready = data_dir / "captures" / "ready" / rid
        active = data_dir / "captures" / "active" / "w0" / rid
        active.parent.mkdir(parents=True)
        shutil.move(ready, active)
        meta = read_meta(active)
        write_meta(active, dataclasses.replace(meta, ended_at=None))  # still running
        live.pass_once()
        assert live.bytes_sent == 2 * 3 * WIRE_SECOND
        live.pass_once()  # nothing new: nothing sent again
        assert live.bytes_sent == 2 * 3 * WIRE_SECOND
        live2, _ = _uplink(tmp_path, store.address)  # a restarted agent: asks the store
        with (active / "customer.wav").open("ab") as leg:
            leg.write(b"\1\0" * 8000)  # the call goes on: one more second on one leg
        live2.pass_once()
        assert live2.bytes_sent == WIRE_SECOND


class _Calls(grpc.UnaryUnaryClientInterceptor):
    """The methods a channel called, in order (a real channel, only counted)."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_unary_unary(self, continuation, details, request):
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return continuation(details, request)


def test_a_hang_up_after_the_stream_costs_one_round_trip(tmp_path: Path) -> None:
    with InProcessStore(store_config(tmp_path)) as store:
        calls = _Calls()
        keys = make_keys(tmp_path / "keys")
        config, _ = agent_config(tmp_path, keys, store.address, uplink={"live": True})
        channel = grpc.intercept_channel(grpc.insecure_channel(store.address), calls)
        live, data_dir = LiveUplink(config, channel), config.data_dir
        rid = write_capture(data_dir, keys, seconds=3)
        ready = data_dir / "captures" / "ready" / rid
        active = data_dir / "captures" / "active" / "w0" / rid
        active.parent.mkdir(parents=True)
        shutil.move(ready, active)
        meta = read_meta(active)
        write_meta(active, dataclasses.replace(meta, ended_at=None))
        live.pass_once()  # the call so far
        for leg in ("customer", "employee"):
            with (active / f"{leg}.wav").open("ab") as fh:
                fh.write(b"\1\0" * 8000)  # its last second, after the last pass
        write_meta(active, meta)
        shutil.move(active, ready)  # hang-up
        calls.methods.clear()
        live.finish(rid)
        assert calls.methods == ["Finish"]  # the tail rode in it
        assert not ready.exists()
        row = wait_stored(store, rid)
        assert abs(probe(archive_audio(store, row, tmp_path / "a.ogg"))[2] - 4.0) < 0.1
        assert live.bytes_sent == 2 * 4 * WIRE_SECOND


def test_a_call_discarded_while_the_store_is_away_is_told_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The recording control's discard mid-call (issue 21) with the store unreachable:
    nothing is lost or kept; once the store answers, the next pass tells it (once)."""
    caplog.set_level(logging.INFO, logger="agent.recorder.uplink.live")
    port = free_port()
    live, data_dir = _uplink(tmp_path, f"127.0.0.1:{port}")
    rid = write_capture(data_dir, make_keys(tmp_path / "keys"), seconds=2)
    active = data_dir / "captures" / "active" / "w0" / rid
    active.parent.mkdir(parents=True)
    shutil.move(data_dir / "captures" / "ready" / rid, active)
    meta = dataclasses.replace(read_meta(active), ended_at=None)  # the call goes on
    write_meta(active, discarded(meta, iso_ms(utc_now())))
    for leg in ("customer.wav", "employee.wav"):
        (active / leg).unlink()  # as the worker does
    live.pass_once()  # nobody listens: kept for the next pass
    with InProcessStore(store_config(tmp_path, listen=f"127.0.0.1:{port}")) as store:
        catalog = Catalog(store.config.catalog_url)
        try:
            deadline = time.monotonic() + 20
            while discards.get(catalog, rid) is None:
                assert time.monotonic() < deadline, "the discard never reached the store"
                live.pass_once()
                time.sleep(0.2)
            live.pass_once()
            live.pass_once()
            kept = discards.get(catalog, rid)
            assert kept is not None and "discarded" in kept.flags.split(",")
            assert catalog.get(rid) is None
        finally:
            catalog.close()
    sent = [r for r in caplog.records if "live_discard_sent" in r.getMessage()]
    assert len(sent) == 1
    assert live.bytes_sent == 0
