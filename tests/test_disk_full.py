"""The agent's data disk fills: the free-space floor, writes that fail mid-call, and
start-up recovery on a full disk. Small real file systems (tmpfs, mounted as root)
filled to the last page; the end-to-end case runs the agent, its Kamailio front, its
workers and the store, with SIPp as the SRC."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import struct
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from agent import logs
from agent.capture import (
    CAPTURE_FILE,
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Direction,
    Flag,
    iso_ms,
    new_recording_id,
    parse_iso,
    read_meta,
    recover_active,
    write_meta,
)
from agent.config import ConfigError, FreeSpaceFloor, agent_config_from_dict
from agent.recorder.diskspace import DiskGuard, stalled_legs
from agent.recorder.ownership import CaptureOwner
from agent.recorder.sip import call_ref
from tests.support.audio import decode
from tests.support.daemons import Daemon
from tests.support.faults import fill_disk, kill_agent, small_tmpfs
from tests.support.pool import Pool, assert_times, flags, running_pool
from tests.support.stack import Keys, agent_config

START = dt.datetime(2026, 3, 2, 9, 0, 0, tzinfo=dt.UTC)


def _capture(active: Path, keys: Keys, seconds: float, beat: dt.datetime | None) -> Path:
    """What a worker SIGKILLed mid-call leaves: capture.json without an end, two legs
    whose headers still say 0 bytes, the owner file with its last heartbeat."""
    rid = new_recording_id()
    capture = active / rid
    capture.mkdir(parents=True)
    write_meta(capture, CaptureMeta(
        recording_id=rid, site="hel-1", source="siprec", call_ref=rid[:16],
        direction=Direction.INBOUND, started_at=iso_ms(START), ended_at=None,
        service_number=None, customer=keys.protector().protect("+358 40 123 4567"),
        employees=(), legs=(CUSTOMER_LEG, EMPLOYEE_LEG),
    ))  # fmt: skip
    header = (
        b"RIFF"
        + struct.pack("<I", 0)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16)
    )
    header += b"data" + struct.pack("<I", 0)
    for leg in (CUSTOMER_LEG, EMPLOYEE_LEG):
        (capture / leg).write_bytes(header + bytes(int(seconds * 16000)))
        late = (START + dt.timedelta(seconds=seconds + 24)).timestamp()
        os.utime(capture / leg, (late, late))  # what a failed repair used to leave
    if beat is not None:
        owner = CaptureOwner.claim(capture, iso_ms(beat))
        owner.release()
    return capture


def test_min_free_is_a_size_or_a_share(tmp_path: Path, keys: Keys) -> None:
    cfg, doc = agent_config(tmp_path, keys, "127.0.0.1:1")
    assert cfg.min_free == FreeSpaceFloor(bytes=2 * 1024**3)  # the documented default
    doc["agent"]["min_free"] = "5%"
    assert agent_config_from_dict(doc, tmp_path).min_free.floor(1000 * 1024**2) == 50 * 1024**2
    doc["agent"]["min_free"] = "500 MB"
    assert agent_config_from_dict(doc, tmp_path).min_free.floor(10**12) == 500 * 10**6
    doc["agent"]["min_free"] = "lots"
    with pytest.raises(ConfigError, match=r"\[agent\] min_free = 'lots': expected a size"):
        agent_config_from_dict(doc, tmp_path)


def test_floor_refuses_below_it_counts_and_logs_each_crossing_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        guard = DiskGuard(disk, FreeSpaceFloor(bytes=1024**2), worker=3)
        refused_before = REGISTRY.get_sample_value("callrec_disk_full_refusals_total") or 0.0
        with caplog.at_level(logging.INFO):
            assert guard.room_for_a_call()
            assert REGISTRY.get_sample_value("callrec_disk_free_bytes") == 4 * 1024**2
            filler = fill_disk(disk)
            assert not guard.room_for_a_call() and not guard.room_for_a_call()
            assert REGISTRY.get_sample_value("callrec_disk_free_bytes") == 0
            filler.unlink()
            assert guard.room_for_a_call()
    refused = REGISTRY.get_sample_value("callrec_disk_full_refusals_total")
    assert refused == refused_before + 2
    events = [
        (getattr(r, logs.EVENT_ATTR, ""), getattr(r, logs.FIELDS_ATTR, {})) for r in caplog.records
    ]
    below = [fields for event, fields in events if event == "disk_below_floor"]
    assert below == [
        {"worker": 3, "free_bytes": 0, "min_free_bytes": 1024**2, "action": "refuse_new_calls"}
    ]
    assert [event for event, _ in events].count("disk_above_floor") == 1


def test_capture_json_is_updated_in_place_on_a_full_disk(tmp_path: Path, keys: Keys) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        capture = _capture(disk / "active", keys, seconds=1.0, beat=None)
        meta = read_meta(capture)
        fill_disk(disk)
        ended = replace_end(meta, START + dt.timedelta(seconds=31))
        write_meta(capture, ended)  # the rename needs a new block; in place needs none
        assert read_meta(capture) == ended
        assert not (capture / (CAPTURE_FILE + ".tmp")).exists()


def replace_end(meta: CaptureMeta, end: dt.datetime) -> CaptureMeta:
    doc = json.loads(meta.to_json())
    doc["ended_at"] = iso_ms(end)
    return CaptureMeta.from_json(json.dumps(doc))


def test_recovery_on_a_full_disk_keeps_the_timing_and_quarantines_what_it_cannot_read(
    tmp_path: Path, keys: Keys
) -> None:
    """Killed worker's captures, a directory without capture.json (a call answered
    while the disk was full, before this fix) and a disk full to the last page: the
    readable captures are recovered with the end their audio and heartbeat prove (not
    the legs' mtime, 24 s later), the partial one is quarantined, nothing raises."""
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        active, ready, quarantine = disk / "active" / "w0", disk / "ready", disk / "quarantine"
        ready.mkdir()
        quarantine.mkdir()
        by_audio = _capture(active, keys, seconds=30.0, beat=START + dt.timedelta(seconds=29.4))
        by_beat = _capture(active, keys, seconds=10.0, beat=START + dt.timedelta(seconds=20.0))
        partial = active / new_recording_id()
        partial.mkdir()
        (partial / CUSTOMER_LEG).write_bytes(b"RIFF")
        fill_disk(disk)
        result = recover_active(active, ready, quarantine)
        assert sorted(result.recovered) == sorted([by_audio.name, by_beat.name])
        assert result.failed == [] and result.in_use == []
        assert [name for name, _ in result.quarantined] == [partial.name]
        assert "no capture.json" in result.quarantined[0][1]
        assert (quarantine / partial.name / CUSTOMER_LEG).exists()
        for capture, seconds in ((by_audio, 30.0), (by_beat, 20.0)):
            meta = read_meta(ready / capture.name)
            assert meta.ended_at is not None and Flag.INCOMPLETE in meta.flags
            assert parse_iso(meta.ended_at) - START == dt.timedelta(seconds=seconds)
        with wave.open(str(ready / by_audio.name / CUSTOMER_LEG)) as leg:  # header repaired
            assert leg.getnframes() == 30 * 8000


def test_recovery_leaves_a_capture_alone_while_its_owner_lives(tmp_path: Path, keys: Keys) -> None:
    active, ready = tmp_path / "active" / "w0", tmp_path / "ready"
    capture = _capture(active, keys, seconds=2.0, beat=None)
    owner = CaptureOwner.claim(capture, iso_ms(START))  # a live worker still records it
    before = {p.name: p.read_bytes() for p in capture.iterdir()}
    result = recover_active(active, ready, tmp_path / "quarantine")
    assert result.in_use == [capture.name] and result.recovered == []
    assert {p.name: p.read_bytes() for p in capture.iterdir()} == before
    owner.release()  # the worker died: the kernel drops its lock
    assert recover_active(active, ready, tmp_path / "quarantine").recovered == [capture.name]


# ---------------------------------------------------------------- the agent, for real (slow)

CALL_MS = 7_000  # within the test speech (RTP stops after ~7.5 s)
FILL_AT_S = 2.5


@pytest.mark.slow
@pytest.mark.sip
def test_disk_fills_mid_calls(tmp_path: Path) -> None:
    """Three 7 s calls; 2.5 s in, the agent's data disk (a 48 MB tmpfs) is filled to the
    last page. A new call gets 503 from the front (every worker refuses it below
    ``min_free``) and nothing is answered; the calls in progress run to their BYE, no
    worker dies; once space is freed each is stored, flagged incomplete, with SIPp's
    answer and BYE times and every second of audio that was on disk."""
    data_dir = tmp_path / "agent" / "agent-data"
    with (
        small_tmpfs(data_dir, "48m"),
        running_pool(tmp_path, workers=2, agent_section={"min_free": "8 MB"}) as pool,
    ):
        pool.wait_idle()
        pids = pool.worker_pids()
        with ThreadPoolExecutor(3) as executor:
            calls = [
                executor.submit(pool.place, pool.call(call_ms=CALL_MS), f"c{n}", 30.0)
                for n in range(3)
            ]
            time.sleep(FILL_AT_S)
            filler = fill_disk(data_dir)
            on_disk = _leg_seconds(data_dir)  # what the calls recorded until now
            refused = pool.place(pool.call(call_ms=1000, accept_refusal=True), "late", 10.0)
            results = [c.result() for c in calls]
        assert refused.first is not None and refused.first.refused_status == 503
        assert f"call_ref={call_ref(refused.call_id or '')}" not in _answered(pool)
        text = pool.text()
        assert "event=disk_below_floor" in text and "reason=disk_full" in text
        filler.unlink()
        rows = pool.stored_many([r.call_id or "" for r in results], timeout=60)
        assert pool.worker_pids() == pids and "event=worker_died" not in pool.text()
        for result in results:
            assert result.ok, result.errors[-1500:]
            row = rows[result.call_id or ""]
            assert_times(row, result.answered_at, result.bye_at)
            assert "incomplete" in flags(row), row.flags
            audio = decode(pool.export(row, tmp_path / f"{row.recording_id}.ogg"))
            stored_s = len(audio[1]) / audio[0] / 8000
            recorded_s = on_disk[row.recording_id]
            assert recorded_s - 0.3 <= stored_s <= recorded_s + 3.0, (stored_s, recorded_s)
            assert stored_s < CALL_MS / 1000 - 3.0
        # Room again: the floor is cleared and a call is recorded whole.
        again = pool.place(pool.call(call_ms=3000), "again", 20.0)
        assert again.ok, again.errors[-1500:]
        row = pool.stored(again.call_id)
        assert flags(row) == set() and abs(row.duration_ms - 3000) <= 500
        assert "event=disk_above_floor" in pool.text()


def _leg_seconds(data_dir: Path) -> dict[str, float]:
    """Audio seconds in the shorter leg of each capture being recorded."""
    found: dict[str, float] = {}
    for leg in (data_dir / "captures" / "active").glob("w*/*/*.wav"):
        seconds = max(0, leg.stat().st_size - 44) / 16000
        rid = leg.parent.name
        found[rid] = min(found.get(rid, seconds), seconds)
    return found


def _answered(pool: Pool) -> str:
    return "\n".join(line for line in pool.text().splitlines() if "event=call_answered" in line)


@pytest.mark.slow
@pytest.mark.sip
def test_agent_restarts_on_a_full_disk_and_recovers_what_was_cut(tmp_path: Path) -> None:
    """The disk fills during two calls, then the agent and its workers are SIGKILLed
    and started again while it is still full: start-up and recovery succeed, and once
    there is room both calls are stored, flagged incomplete, with their answer time, an
    end at the kill (what the heartbeat proves; not the restart) and their audio."""
    data_dir = tmp_path / "agent" / "agent-data"
    with (
        small_tmpfs(data_dir, "48m"),
        running_pool(tmp_path, workers=1, agent_section={"min_free": "8 MB"}) as pool,
    ):
        pool.wait_idle()
        with ThreadPoolExecutor(2) as executor:
            calls = [
                executor.submit(pool.place, pool.call(call_ms=CALL_MS), f"c{n}", 30.0)
                for n in range(2)
            ]
            time.sleep(FILL_AT_S)
            filler = fill_disk(data_dir)
            on_disk = _leg_seconds(data_dir)
            time.sleep(1.5)
            seen = len(pool.text())
            kill_agent(pool.agent)
            killed_at = time.time()
            again = Daemon("agent", pool.agent.args, pool.agent.log, pool.agent.env)
            again.start().wait_for(r"event=agent_ready", timeout=60, after=seen)
            pool.agent = again
            results = [c.result() for c in calls]  # their BYEs find no dialog (481)
        again.wait_for(r"event=worker_ready", after=seen)
        assert pool.text().count("event=capture_recovered", seen) == 2
        filler.unlink()
        rows = pool.stored_many([r.call_id or "" for r in results], timeout=60)
        for result in results:
            row = rows[result.call_id or ""]
            assert flags(row) == {"incomplete"}, row.flags
            assert result.answered_at is not None
            assert abs(row.started_at_ms / 1000 - result.answered_at) <= 0.5
            assert killed_at - 1.5 <= row.ended_at_ms / 1000 <= killed_at + 0.2
            audio = decode(pool.export(row, tmp_path / f"{row.recording_id}.ogg"))
            stored_s = len(audio[1]) / audio[0] / 8000
            assert abs(stored_s - on_disk[row.recording_id]) <= 0.5, stored_s


def test_a_leg_is_stalled_only_when_it_stops_growing_behind_its_call(tmp_path: Path) -> None:
    legs = [tmp_path / CUSTOMER_LEG, tmp_path / EMPLOYEE_LEG]
    for leg in legs:
        leg.write_bytes(bytes(44 + 16000))  # 1 s of audio
    sizes: dict[str, int] = {}
    assert stalled_legs(legs, sizes, expected_bytes=5 * 16000) == []  # first look
    assert stalled_legs(legs, sizes, expected_bytes=2 * 16000) == []  # not far enough behind
    with legs[0].open("ab") as grown:
        grown.write(bytes(16000))
    assert stalled_legs(legs, sizes, expected_bytes=6 * 16000) == [EMPLOYEE_LEG]
