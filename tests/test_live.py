"""Live upload end to end: SIPp (the PBX) places SIPREC calls into the real agent with
``[uplink] live = true``, which streams them to the real store through a loopback
proxy while they run. What is checked is what an operator would: the store holds the
call's audio, decryptable and byte for byte what the worker wrote, at most 2 s behind
while the call is still up; and after a worker SIGKILLed mid-call, a store SIGKILLed
and restarted mid-call, or a network cut mid-call, there is exactly one recording
whose audio is complete (the store checked each leg's sha256 against the agent's
before the agent let go of its copy), and the agent host keeps nothing."""

from __future__ import annotations

import array
import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

with warnings.catch_warnings():  # deprecated in 3.11 (the project pins Python < 3.13)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from agent.config import load_store_config
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.sip import call_ref
from agent.store.archive.vault import open_storage
from agent.store.catalog import Catalog, RecordingRow
from agent.store.live.segments import LiveStore
from agent.testcall.sipp import SippResult, SiprecCall, free_port, run_sipp, siprec_scenario
from tests.support.audio import Speech, long_speech, probe
from tests.support.daemons import Daemon, start_agent, start_store
from tests.support.proxy import TcpProxy
from tests.support.stack import Keys, make_keys

pytestmark = [pytest.mark.sip, pytest.mark.slow]

SECOND = 16_000  # bytes of one leg in the worker's file (mono 16-bit PCM at 8 kHz)
WIRE_SECOND = 8_000  # bytes of one leg on the wire and at the store (G.711 A-law)
WAV_HEADER = 44
LEGS = ("customer", "employee")


@dataclass
class Live:
    root: Path
    keys: Keys
    speech: Speech
    store_port: int
    sip_port: int
    proxy: TcpProxy
    store: Daemon
    agent: Daemon
    live_timeout: str = "60s"
    calls: list[SippResult] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        return Catalog(f"sqlite:///{self.root / 'store-data' / 'catalog.sqlite3'}")

    def start_store(self) -> None:
        self.store, _ = start_store(self.root, port=self.store_port, live_timeout=self.live_timeout)

    def call_in_background(self, name: str, call_ms: int) -> threading.Thread:
        call = SiprecCall(
            self.speech.customer, self.speech.employee, call_ms=call_ms,
            service="sip:01005577@pbx.example",
        )  # fmt: skip
        workdir = self.root / "pbx" / name

        def run() -> None:
            target = ("127.0.0.1", self.sip_port)
            self.calls.append(
                run_sipp(siprec_scenario(call), target, workdir, timeout_s=call_ms / 1000 + 30)
            )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def active_capture(self, timeout: float = 20.0) -> Path:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [
                p
                for p in (self.root / "agent-data" / "captures" / "active").glob("w*/*")
                if p.is_dir()
            ]
            if found and (found[0] / "customer.wav").exists():
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no active capture:\n{self.agent.text()[-2000:]}")

    def stored(self, rid: str, timeout: float = 60.0) -> RecordingRow:
        catalog = self.catalog
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if (row := catalog.get(rid)) is not None:
                    return row
                time.sleep(0.2)
        finally:
            catalog.close()
        raise AssertionError(
            f"{rid} not stored:\n{self.agent.text()[-3000:]}\n{self.store.text()[-2000:]}"
        )

    def store_sizes(self, rid: str) -> dict[str, int]:
        with grpc.insecure_channel(f"127.0.0.1:{self.store_port}") as channel:
            state = pb_grpc.LiveStub(channel).Query(
                pb.LiveQueryRequest(recording_id=rid), timeout=5
            )
        return {s.leg: s.size for s in state.legs}

    def store_leg(self, rid: str, leg: str) -> bytes:
        storage = open_storage(load_store_config(self.root / "store.toml"))
        try:
            live = LiveStore(storage.catalog, storage.vault, self.root / "scratch")
            row = live.get(rid)
            assert row is not None
            return b"".join(live.read_leg(row, leg))
        finally:
            storage.catalog.close()

    def audio_seconds(self, row: RecordingRow) -> float:
        storage = open_storage(load_store_config(self.root / "store.toml"))
        try:
            target = self.root / f"{row.recording_id}.ogg"
            target.write_bytes(b"".join(storage.vault.read(row.recording_id, row.blob_key)))
        finally:
            storage.catalog.close()
        return probe(target)[2]

    def assert_nothing_left_on_the_agent(self) -> None:
        data = self.root / "agent-data"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [p for p in (data / "captures").glob("*/**/*.wav")] + list(
                (data / "outbox").iterdir()
            )
            if not left:
                return
            time.sleep(0.2)
        raise AssertionError(f"left on the agent: {left}")


def g711_round_trip(pcm: bytes) -> tuple[float, float]:
    """How ``pcm`` comes back from A-law: (the fraction of samples that come back
    exactly, the signal-to-error ratio in dB)."""
    back = array.array("h", audioop.alaw2lin(audioop.lin2alaw(pcm, 2), 2))
    samples = array.array("h", pcm)
    signal = sum(x * x for x in samples)
    error = sum((x - y) ** 2 for x, y in zip(samples, back, strict=True))
    exact = sum(1 for x, y in zip(samples, back, strict=True) if x == y) / max(len(samples), 1)
    return exact, 10 * math.log10(signal / error) if error else math.inf


def _rows_for(live: Live, rid: str) -> int:
    catalog = live.catalog
    try:
        return sum(1 for r in catalog.list(limit=10_000) if r.recording_id == rid)
    finally:
        catalog.close()


@contextmanager
def live_stack(root: Path, live_timeout: str = "60s") -> Iterator[Live]:
    keys = make_keys(root / "keys")
    speech = long_speech(root / "speech", 14)  # 21 s: SIPp ends when its RTP does
    store_port, sip_port = free_port(), free_port()
    store, _ = start_store(root, port=store_port, live_timeout=live_timeout)
    proxy = TcpProxy(store_port, lifetime_s=300).__enter__()
    try:
        agent = start_agent(
            root, keys, f"127.0.0.1:{proxy.port}", sip_port,
            uplink={"live": True, "live_flush": "1s", "rescan": "2s"},
        )  # fmt: skip
    except BaseException:
        proxy.stop()
        store.stop()
        raise
    state = Live(root, keys, speech, store_port, sip_port, proxy, store, agent, live_timeout)
    try:
        yield state
    finally:
        state.agent.stop()
        proxy.stop()
        state.store.stop()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with live_stack(tmp_path) as stack:
        yield stack


def test_the_store_holds_the_call_while_it_runs_and_the_archive_after(live: Live) -> None:
    call = live.call_in_background("running", call_ms=16_000)
    capture = live.active_capture()
    rid = capture.name
    time.sleep(8)
    local = {  # samples the worker wrote
        leg: ((capture / f"{leg}.wav").stat().st_size - WAV_HEADER) // 2
        for leg in ("customer", "employee")
    }
    held = live.store_sizes(rid)  # A-law: one byte per sample
    for leg, samples in local.items():
        assert samples - 2 * WIRE_SECOND <= held[leg] <= samples + WIRE_SECOND, (local, held)
        assert held[leg] >= 5 * WIRE_SECOND
        # Decryptable, and exactly the worker's samples in A-law; decoded, they are the
        # PCM the file path would have encoded (pjsua decoded them from the SRC's A-law).
        stored = live.store_leg(rid, leg)  # (the call goes on: it may have grown since)
        assert len(stored) >= held[leg]
        pcm = (capture / f"{leg}.wav").read_bytes()[WAV_HEADER : WAV_HEADER + 2 * len(stored)]
        assert stored == audioop.lin2alaw(pcm, 2)
        # Bit-exact but for what pjsua made itself (silence before the first packet,
        # concealment of late packets): measured 96 % exact, 63 dB, where the archive's
        # Opus is ~12 dB from its input (README Performance).
        exact, snr_db = g711_round_trip(pcm)
        assert exact >= 0.8 and snr_db >= 40, (leg, exact, snr_db)
    call.join(60)
    assert live.calls and live.calls[0].ok, live.calls[0].errors if live.calls else "no result"

    row = live.stored(rid)
    assert row.call_ref == call_ref(live.calls[0].call_id or "")
    assert abs(row.duration_ms - 16_000) <= 700 and row.flags == ""
    assert row.channels == 2 and row.audio_format == "opus"
    assert abs(live.audio_seconds(row) - row.duration_ms / 1000) < 0.7
    assert "path=live" in live.agent.text() and "event=recording_finalized" not in live.agent.text()
    live.assert_nothing_left_on_the_agent()


def test_worker_sigkilled_mid_call_is_stored_once_with_what_it_recorded(live: Live) -> None:
    pids = [
        int(p) for p in re.findall(r"event=worker_started index=0 pid=(\d+)", live.agent.text())
    ]
    live.call_in_background("killed", call_ms=14_000)
    capture = live.active_capture()
    rid = capture.name
    time.sleep(5)
    os.kill(pids[-1], signal.SIGKILL)
    time.sleep(0.2)
    recorded = (capture / "customer.wav").stat().st_size - WAV_HEADER
    row = live.stored(rid)
    assert "incomplete" in row.flags.split(",")
    assert abs(live.audio_seconds(row) - recorded / SECOND) < 0.7, (recorded / SECOND, row)
    assert _rows_for(live, rid) == 1
    assert "event=live_finished" in live.store.text()
    live.assert_nothing_left_on_the_agent()


def test_store_sigkilled_mid_call_and_restarted_loses_nothing(live: Live) -> None:
    call = live.call_in_background("store-killed", call_ms=16_000)
    rid = live.active_capture().name
    time.sleep(4)
    live.store.stop(signal.SIGKILL)
    time.sleep(5)
    live.start_store()
    call.join(60)
    row = live.stored(rid)
    assert row.flags == "" and abs(row.duration_ms - 16_000) <= 700
    # The store checked each leg's sha256 against the agent's at finish: whole, once.
    assert abs(live.audio_seconds(row) - row.duration_ms / 1000) < 0.7
    assert "event=live_store_unreachable" in live.agent.text()
    assert "event=live_store_reachable" in live.agent.text()
    assert _rows_for(live, rid) == 1
    live.assert_nothing_left_on_the_agent()


def test_network_cut_mid_call_catches_up_without_duplicates(live: Live) -> None:
    call = live.call_in_background("cut", call_ms=20_000)
    rid = live.active_capture().name
    time.sleep(3)
    before = live.store_sizes(rid)
    live.proxy.cut_for(10)
    time.sleep(5)
    during = live.store_sizes(rid)  # straight to the store: nothing arrives through the cut
    assert during["customer"] <= before["customer"] + 2 * WIRE_SECOND
    call.join(60)
    row = live.stored(rid)
    assert row.flags == "" and abs(row.duration_ms - 20_000) <= 700
    assert abs(live.audio_seconds(row) - row.duration_ms / 1000) < 0.7
    assert _rows_for(live, rid) == 1
    live.assert_nothing_left_on_the_agent()


def test_agent_host_lost_mid_call_the_store_finishes_it_incomplete(tmp_path: Path) -> None:
    """The whole agent host gone (main process and workers SIGKILLed): after
    live_timeout the store archives what it has, at most 2 s short of what was
    recorded, flagged incomplete. The agent, back with its longer copy, appends the
    rest: the archive is built again in place of the first (one row), with all that
    was recorded, still flagged incomplete (the call's end was lost with the host)."""
    with live_stack(tmp_path, live_timeout="4s") as live:
        workers = re.findall(r"event=worker_started index=0 pid=(\d+)", live.agent.text())
        live.call_in_background("host-lost", call_ms=14_000)
        capture = live.active_capture()
        rid = capture.name
        time.sleep(6)
        assert live.agent.process is not None
        for pid in (live.agent.process.pid, int(workers[-1])):
            os.kill(pid, signal.SIGKILL)
        recorded = (capture / "customer.wav").stat().st_size - WAV_HEADER
        live.agent.process.wait(10)
        row = live.stored(rid, timeout=30)
        assert "incomplete" in row.flags.split(",")
        kept = live.audio_seconds(row)
        assert recorded / SECOND - 2.0 <= kept <= recorded / SECOND + 0.1, (kept, recorded / SECOND)
        assert "event=live_timed_out" in live.store.text()

        seen = len(live.agent.text())
        live.agent.start().wait_for(r"event=agent_ready", timeout=60, after=seen)
        live.agent.wait_for(rf"event=recording_uploaded recording_id={rid}", 60, after=seen)
        live.store.wait_for(rf"event=live_tail_appended recording_id={rid}", timeout=60)
        again = live.stored(rid)
        assert again.blob_key != row.blob_key and "incomplete" in again.flags.split(",")
        whole = live.audio_seconds(again)
        assert abs(whole - recorded / SECOND) <= 0.2, (whole, recorded / SECOND)
        assert _rows_for(live, rid) == 1
        assert not (tmp_path / "agent-data" / "quarantine" / rid).exists()
        live.assert_nothing_left_on_the_agent()


def test_a_30s_network_cut_longer_than_live_timeout_ends_with_one_whole_recording(
    tmp_path: Path,
) -> None:
    """The link to the store cut for 30 s (the proxy resets every connection) from 3 s
    into a 20 s call, with live_timeout 8 s: the store finishes the call as incomplete
    during the cut; when the link is back the agent appends the rest (the call hung up
    meanwhile) and the archive is built again, whole, in place of the first. Whole is
    measured against what the worker wrote (read while the link is still down), so
    that a recorder short of audio on a loaded host is not taken for a loss here."""
    with live_stack(tmp_path, live_timeout="8s") as live:
        call = live.call_in_background("cut30", call_ms=20_000)
        rid = live.active_capture().name
        time.sleep(3)
        live.proxy.cut_for(30)
        live.store.wait_for(rf"event=live_timed_out recording_id={rid}", timeout=30)
        call.join(60)
        assert live.calls and live.calls[0].ok, live.calls[0].errors if live.calls else "none"
        assert live.proxy.down, "the call outlasted the cut: nothing to catch up"
        ready = tmp_path / "agent-data" / "captures" / "ready" / rid
        recorded = max((ready / f"{leg}.wav").stat().st_size - WAV_HEADER for leg in LEGS)
        live.store.wait_for(rf"event=live_tail_appended recording_id={rid}", timeout=90)
        row = live.stored(rid)
        assert row.flags == "" and abs(row.duration_ms - 20_000) <= 700, row
        assert abs(live.audio_seconds(row) - recorded / SECOND) < 0.1, recorded / SECOND
        assert _rows_for(live, rid) == 1
        assert "event=live_store_reachable" in live.agent.text()
        live.assert_nothing_left_on_the_agent()
