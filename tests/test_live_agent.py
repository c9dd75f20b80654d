"""The agent's live uploader against a real store (in-process, port 0), without SIP:
a hung-up capture is finished at the store (tail, sizes and sha256 checked) and only
then deleted; while the store is unreachable the capture stays where it is and is
finished once the store answers again; an active capture is streamed from the
store's durable sizes without resending what the store holds."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import grpc

from agent.capture import read_meta, write_meta
from agent.recorder.uplink.live import LiveUplink
from agent.testcall.sipp import free_port
from tests.support.audio import probe
from tests.support.faults import write_capture
from tests.support.stack import InProcessStore, agent_config, make_keys, store_config
from tests.test_live_store import SECOND, archive_audio, wait_stored


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
        assert live.bytes_sent == 2 * 4 * SECOND


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
        assert live.bytes_sent == 2 * 3 * SECOND
        live.pass_once()  # nothing new: nothing sent again
        assert live.bytes_sent == 2 * 3 * SECOND
        live2, _ = _uplink(tmp_path, store.address)  # a restarted agent: asks the store
        with (active / "customer.wav").open("ab") as leg:
            leg.write(b"\1\0" * 8000)  # the call goes on: one more second on one leg
        live2.pass_once()
        assert live2.bytes_sent == SECOND


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
        assert live.bytes_sent == 2 * 4 * SECOND
