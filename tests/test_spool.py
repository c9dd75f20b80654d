"""Spool pickup: files written the way a PBX writes them (slowly in chunks then closed,
or written elsewhere and renamed in) under a real watchdog observer on ``tmp_path``,
through finalize and the uplink into the real in-process store; every bad case
quarantined while the loop keeps taking good calls; one run through the real
``callrec agent`` process."""

from __future__ import annotations

import json
import math
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.capture import CUSTOMER_LEG, EMPLOYEE_LEG, MIXED_LEG, Flag, read_meta
from agent.config import AgentConfig, ConfigError
from agent.recorder.finalize import Finalizer
from agent.recorder.spool.pickup import SpoolPickup, call_ref
from agent.recorder.uplink.client import Uplink
from agent.recorder.uplink.outbox import Outbox
from agent.store.catalog import Catalog
from tests.support.daemons import start_agent, start_store
from tests.support.stack import InProcessStore, Keys, agent_config

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CUSTOMER = "+358401234567"
LEAKS = [CUSTOMER, CUSTOMER[1:], "0401234567", "040 123 4567", "401234567", "%2B358401234567"]
FAST = {"settle": "0.3s", "orphan_timeout": "2s", "rescan": "1s"}


# ---------------------------------------------------------------- what a PBX writes


def tone(freq: float, seconds: float, rate: int = 8000, amp: int = 8000) -> bytes:
    n = int(seconds * rate)
    return struct.pack(
        f"<{n}h", *(int(amp * math.sin(2 * math.pi * freq * i / rate)) for i in range(n))
    )


def wav(pcm: bytes, rate: int = 8000, channels: int = 1, codec: str = "pcm") -> bytes:
    """A WAV as Asterisk/FreeSWITCH write it (A-law/µ-law with an 18-byte fmt and a fact
    chunk, as sox does)."""
    if codec == "pcm":
        data, tag, bits, fmt_extra, fact = pcm, 1, 16, b"", b""
    else:
        data = audioop.lin2alaw(pcm, 2) if codec == "alaw" else audioop.lin2ulaw(pcm, 2)
        tag, bits, fmt_extra = (6 if codec == "alaw" else 7), 8, b"\0\0"
        fact = b"fact" + struct.pack("<II", 4, len(data) // channels)
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + fmt_extra
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + fact
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def interleave(left: bytes, right: bytes) -> bytes:
    return audioop.add(audioop.tostereo(left, 2, 1, 0), audioop.tostereo(right, 2, 0, 1), 2)


def write_slowly(path: Path, data: bytes, chunks: int = 6, pause: float = 0.15) -> None:
    """Open, write in chunks over time, then close (MixMonitor, record_session)."""
    step = -(-len(data) // chunks)
    with path.open("wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i : i + step])
            fh.flush()
            time.sleep(pause)


def rename_in(path: Path, data: bytes) -> None:
    """Write elsewhere, then rename into the spool (a PBX's post-processing script)."""
    elsewhere = path.parent.parent / "pbx-tmp" / path.name
    elsewhere.parent.mkdir(exist_ok=True)
    elsewhere.write_bytes(data)
    elsewhere.rename(path)


def sidecar(call_id: str, audio: dict[str, str], **fields: object) -> bytes:
    doc: dict[str, object] = {
        "version": 1,
        "call_id": call_id,
        "started_at": "2026-03-02T09:15:00Z",
        "ended_at": "2026-03-02T09:15:03Z",
        "direction": "inbound",
        "customer": "040 123 4567",
        "service": "0100 5577",
        "employee": "1001",
        "audio": audio,
    }
    doc.update(fields)
    return json.dumps(doc).encode()


def deliver_pair(spool: Path, stem: str, seconds: float = 1.0) -> None:
    rename_in(spool / f"{stem}-r.wav", wav(tone(440, seconds)))
    rename_in(spool / f"{stem}-t.wav", wav(tone(1000, seconds, amp=2000)))
    rename_in(
        spool / f"{stem}.json",
        sidecar(stem, {"customer": f"{stem}-r.wav", "employee": f"{stem}-t.wav"}),
    )


# ---------------------------------------------------------------- the pickup under test


@dataclass
class Spool:
    cfg: AgentConfig
    dir: Path
    pickup: SpoolPickup

    @property
    def ready(self) -> Path:
        return self.cfg.captures_dir / "ready"

    def captures(self) -> list[str]:
        return sorted(p.name for p in self.ready.iterdir()) if self.ready.exists() else []

    def quarantined(self) -> list[Path]:
        q = self.cfg.quarantine_dir
        return sorted(p for p in q.iterdir() if p.is_dir()) if q.exists() else []

    def restart(self) -> None:
        self.pickup.stop()
        self.pickup.join(10)
        self.pickup = SpoolPickup.from_config(self.cfg)
        self.pickup.start()


def wait_for(what: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def make_spool(
    tmp_path: Path, keys: Keys, store_address: str = "127.0.0.1:9", **spool: object
) -> Spool:
    spool_dir = tmp_path / "pbx-spool"
    spool_dir.mkdir(exist_ok=True)
    cfg, _ = agent_config(
        tmp_path, keys, store_address, spool={"dir": str(spool_dir), **FAST, **spool}
    )
    return Spool(cfg, spool_dir, SpoolPickup.from_config(cfg))


@pytest.fixture
def spool(tmp_path: Path, keys: Keys) -> Iterator[Spool]:
    running = make_spool(tmp_path, keys)
    running.pickup.start()
    yield running
    assert running.pickup.is_alive(), "the loop survived everything the test threw at it"
    running.pickup.stop()
    running.pickup.join(10)


def assert_no_full_number(root: Path, text: str = "") -> None:
    for form in LEAKS:
        assert form not in text, form
    for path in root.rglob("*"):
        if path.is_file() and path.suffix != ".wav":
            data = path.read_bytes()
            for form in LEAKS:
                assert form.encode() not in data, (path, form)


def rms(path: Path) -> int:
    with path.open("rb") as fh:
        return int(audioop.rms(fh.read()[44:], 2))


# ---------------------------------------------------------------- good deliveries


def test_pair_written_slowly_becomes_one_stored_recording(
    tmp_path: Path, keys: Keys, store: InProcessStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    s = make_spool(tmp_path, keys, store.address)
    s.pickup.start()
    try:
        # The sidecar first (FreeSWITCH-style), then both legs written slowly.
        (s.dir / "c1.json").write_bytes(
            sidecar("1719990000.42", {"customer": "c1-r.wav", "employee": "c1-t.wav"})
        )
        writer = threading.Thread(
            target=write_slowly, args=(s.dir / "c1-r.wav", wav(tone(440, 3.0)), 8, 0.15)
        )
        writer.start()
        write_slowly(s.dir / "c1-t.wav", wav(tone(1000, 3.0, amp=2000)), 8, 0.15)
        time.sleep(0.2)
        assert s.captures() == [], "nothing taken while a leg is still open for writing"
        writer.join()
        wait_for(s.captures)
        time.sleep(1.5)  # a rescan and any late events must not take it twice
    finally:
        s.pickup.stop()
        s.pickup.join(10)
    [rid] = s.captures()
    meta = read_meta(s.ready / rid)
    assert meta.source == "spool" and meta.call_ref == call_ref("1719990000.42")
    assert meta.legs == (CUSTOMER_LEG, EMPLOYEE_LEG)
    assert rms(s.ready / rid / CUSTOMER_LEG) > 3 * rms(s.ready / rid / EMPLOYEE_LEG)
    assert meta.started_at == "2026-03-02T09:15:00.000Z"

    Finalizer(s.cfg).handle(rid)
    uplink = Uplink(s.cfg.uplink, Outbox(s.cfg.outbox_dir), s.cfg.quarantine_dir)
    try:
        uplink.handle(rid)
    finally:
        uplink.close()
    row = Catalog(store.config.catalog_url).get(rid)
    assert row is not None and row.source == "spool"
    assert row.customer_masked == "+358401234***" and row.customer_tail_sealed
    assert row.employee_name == "Aino Virtanen" and row.employee_id == "e1001"
    assert row.service_number == "+3581005577" and row.direction == "inbound"
    assert row.duration_ms == 3000 and row.channels == 2
    assert sorted(p.name for p in s.dir.iterdir()) == ["c1-r.wav", "c1-t.wav", "c1.json"]
    assert "event=spool_taken" in caplog.text
    assert_no_full_number(s.cfg.data_dir, caplog.text)


@pytest.mark.parametrize(
    ("codec", "rate", "layout"),
    [("pcm", 16000, "stereo-right"), ("alaw", 8000, "stereo-left"), ("ulaw", 8000, "mixed")],
)
def test_stereo_and_mixed_wavs_renamed_in(spool: Spool, codec: str, rate: int, layout: str) -> None:
    loud, quiet = tone(440, 1.0, rate), tone(1000, 1.0, rate, amp=1000)
    if layout == "mixed":
        rename_in(spool.dir / "m.wav", wav(loud, rate, 1, codec))
        audio = {"mixed": "m.wav"}
    else:
        side = layout.split("-")[1]
        pair = (loud, quiet) if side == "left" else (quiet, loud)
        rename_in(spool.dir / "m.wav", wav(interleave(*pair), rate, 2, codec))
        audio = {"stereo": "m.wav", "customer_channel": side}
    rename_in(spool.dir / "m.json", sidecar("m-1", audio, ended_at=None, started_at=1772442900))
    wait_for(spool.captures)
    [rid] = spool.captures()
    meta = read_meta(spool.ready / rid)
    if layout == "mixed":
        assert meta.legs == (MIXED_LEG,)
        assert abs(rms(spool.ready / rid / MIXED_LEG) - rms_of(loud)) < 200
    else:
        assert meta.legs == (CUSTOMER_LEG, EMPLOYEE_LEG)
        customer, employee = (rms(spool.ready / rid / leg) for leg in meta.legs)
        assert abs(customer - rms_of(loud)) < 200 and abs(employee - rms_of(quiet)) < 100
    with (spool.ready / rid / meta.legs[0]).open("rb") as fh:
        header = fh.read(44)
    assert struct.unpack_from("<HI", header, 22) == (1, rate), "mono, native rate"
    assert struct.unpack_from("<H", header, 34) == (16,)
    assert meta.ended_at == "2026-03-02T09:15:01.000Z", "start + audio length"


def rms_of(pcm: bytes) -> int:
    return int(audioop.rms(pcm, 2))


def test_startup_rescan_and_duplicate_delivery_yield_one_recording(
    tmp_path: Path, keys: Keys
) -> None:
    s = make_spool(tmp_path, keys)
    deliver_pair(s.dir, "d1")  # arrived while the agent was down
    s.pickup.start()
    try:
        wait_for(s.captures)
        # The PBX delivers the same call again under other names, then we restart.
        data = {n: (s.dir / f"d1{n}").read_bytes() for n in ("-r.wav", "-t.wav")}
        rename_in(s.dir / "again-r.wav", data["-r.wav"])
        rename_in(s.dir / "again-t.wav", data["-t.wav"])
        rename_in(
            s.dir / "again.json",
            sidecar("d1", {"customer": "again-r.wav", "employee": "again-t.wav"}),
        )
        wait_for(lambda: s.pickup.index.is_handled(_key(s.dir / "again.json")))
        s.restart()
        time.sleep(1.5)
        # Same call id, different audio (a second recording of a transferred call).
        rename_in(s.dir / "d2-r.wav", wav(tone(300, 1.0)))
        rename_in(s.dir / "d2-t.wav", data["-t.wav"])
        rename_in(
            s.dir / "d2.json", sidecar("d1", {"customer": "d2-r.wav", "employee": "d2-t.wav"})
        )
        wait_for(lambda: len(s.captures()) == 2)
        time.sleep(1.2)
        assert s.pickup.is_alive()
    finally:
        s.pickup.stop()
        s.pickup.join(10)
    assert len(s.captures()) == 2 and s.quarantined() == []


def _key(path: Path) -> tuple[str, int, int]:
    st = path.lstat()
    return (path.name, st.st_mtime_ns, st.st_size)


def test_owned_spool_is_emptied_only_once_in_the_outbox(tmp_path: Path, keys: Keys) -> None:
    s = make_spool(tmp_path, keys, owned=True)
    s.pickup.start()
    try:
        deliver_pair(s.dir, "o1")
        wait_for(s.captures)
        time.sleep(1.5)
        assert len(list(s.dir.iterdir())) == 3, "kept while only in captures/ready"
        [rid] = s.captures()
        Finalizer(s.cfg).handle(rid)
        assert (s.cfg.outbox_dir / rid).is_dir()
        wait_for(lambda: list(s.dir.iterdir()) == [])
        # Delivered again: one recording still, and the duplicate's files go too.
        deliver_pair(s.dir, "o1")
        wait_for(lambda: list(s.dir.iterdir()) == [])
        assert s.captures() == [] and Outbox(s.cfg.outbox_dir).entries() == [rid]
    finally:
        s.pickup.stop()
        s.pickup.join(10)


# ---------------------------------------------------------------- what cannot be read


def _truncated(spool: Path) -> None:
    whole = wav(tone(440, 1.0))
    rename_in(spool / "t-r.wav", whole[: len(whole) // 2])
    rename_in(spool / "t-t.wav", wav(tone(1000, 1.0)))
    rename_in(spool / "t.json", sidecar("t", {"customer": "t-r.wav", "employee": "t-t.wav"}))


def _no_sidecar(spool: Path) -> None:
    rename_in(spool / f"{CUSTOMER}-alone.wav", wav(tone(440, 1.0)))


def _number_in_audio_name(spool: Path) -> None:
    """A name as PBXs write it: the number glued to letters and ``_``."""
    rename_in(spool / "call_0401234567.wav", wav(tone(440, 1.0)))


def _number_in_sidecar_names(spool: Path) -> None:
    text = sidecar("cid0401234567", {"mixed": "sip:%2B358401234567@pbx.wav"}).decode()
    rename_in(spool / "cid0401234567.json", text[:-20].encode())


def _malformed(spool: Path) -> None:
    rename_in(spool / "bad.wav", wav(tone(440, 1.0)))
    text = sidecar("bad", {"mixed": "bad.wav"}).decode()
    rename_in(spool / "bad.json", text[:-20].encode())


def _audio_never_arrives(spool: Path) -> None:
    rename_in(spool / "late.json", sidecar("late", {"mixed": "late.wav"}))


def _dotdot(spool: Path) -> None:
    (spool.parent / "outside.wav").write_bytes(wav(tone(440, 1.0)))
    rename_in(spool / "up.json", sidecar("up", {"mixed": "../outside.wav"}))


def _symlink(spool: Path) -> None:
    (spool.parent / "secret.wav").write_bytes(wav(tone(440, 1.0)))
    (spool / "link.wav").symlink_to(spool.parent / "secret.wav")
    rename_in(spool / "link.json", sidecar("link", {"mixed": "link.wav"}))


@pytest.mark.parametrize(
    ("deliver", "reason", "copies"),
    [
        (_truncated, "truncated WAV", 2),
        (_no_sidecar, "no sidecar", 1),
        (_number_in_audio_name, "no sidecar", 1),
        (_number_in_sidecar_names, "not JSON", 0),
        (_malformed, "not JSON", 0),
        (_audio_never_arrives, "audio never arrived", 0),
        (_dotdot, "escapes the spool", 0),
        (_symlink, "not a regular file", 0),
    ],
    ids=[
        "truncated",
        "no-sidecar",
        "number-in-audio",
        "number-in-sidecar",
        "malformed",
        "audio-never-arrives",
        "dotdot",
        "symlink",
    ],
)
def test_unreadable_delivery_is_quarantined_and_the_loop_goes_on(
    spool: Spool,
    caplog: pytest.LogCaptureFixture,
    deliver: Callable[[Path], None],
    reason: str,
    copies: int,
) -> None:
    caplog.set_level("INFO")
    before = sorted(p.name for p in spool.dir.iterdir())
    deliver(spool.dir)
    delivered = sorted(p.name for p in spool.dir.iterdir())
    wait_for(lambda: "event=spool_quarantined" in caplog.text)
    [entry] = spool.quarantined()
    text = (entry.parent / f"{entry.name}.reason").read_text()
    assert reason in text, text
    assert len(list(entry.glob("audio-*.wav"))) == copies
    assert "event=spool_quarantined" in caplog.text and reason in caplog.text
    assert sorted(p.name for p in spool.dir.iterdir()) == delivered, "originals left alone"
    assert before == [] and spool.captures() == []

    deliver_pair(spool.dir, "good")  # the loop is still taking calls
    wait_for(lambda: len(spool.captures()) == 1)
    time.sleep(0.5)
    assert len(spool.quarantined()) == 1, "quarantined once, not at every rescan"
    assert_no_full_number(spool.cfg.data_dir, caplog.text)


def test_dead_writer_header_is_read_to_end_and_flagged(spool: Spool) -> None:
    data = bytearray(wav(tone(440, 1.0)))
    data[4:8] = data[40:44] = b"\0\0\0\0"  # a killed writer never fills the sizes in
    rename_in(spool.dir / "k.wav", bytes(data))
    rename_in(spool.dir / "k.json", sidecar("k", {"mixed": "k.wav"}))
    wait_for(spool.captures)
    meta = read_meta(spool.ready / spool.captures()[0])
    assert Flag.INCOMPLETE in meta.flags


# ---------------------------------------------------------------- config


def test_spool_config(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:9", spool={"dir": "spool", "owned": True})
    assert cfg.spool is not None and cfg.spool.dir == tmp_path / "spool" and cfg.spool.owned
    assert cfg.spool.settle_s == 2.0 and cfg.spool.orphan_timeout_s == 600.0
    assert agent_config(tmp_path, keys, "127.0.0.1:9")[0].spool is None
    for bad, message in [
        ({"dir": "s", "owned": "yes"}, '[spool] owned = "yes": expected true or false'),
        ({"dir": "s", "settle": "1m", "orphan_timeout": "30s"}, "longer than settle"),
        ({"owned": True}, "[spool] dir: missing"),
        ({"dir": "s", "rescan": "soon"}, "[spool] rescan"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            agent_config(tmp_path, keys, "127.0.0.1:9", spool=bad)


# ---------------------------------------------------------------- the real agent


@pytest.mark.sip
def test_real_agent_takes_spool_recordings_and_survives_bad_ones(
    tmp_path: Path, keys: Keys
) -> None:
    from agent.testcall.sipp import free_port

    spool_dir = tmp_path / "pbx-spool"
    spool_dir.mkdir()
    store, address = start_store(tmp_path)
    try:
        agent = start_agent(
            tmp_path, keys, address, free_port(), spool={"dir": str(spool_dir), **FAST}
        )
        try:
            _malformed(spool_dir)
            (spool_dir / "r1.json").write_bytes(
                sidecar("r1", {"customer": "r1-r.wav", "employee": "r1-t.wav"})
            )
            write_slowly(spool_dir / "r1-r.wav", wav(tone(440, 2.0)))
            write_slowly(spool_dir / "r1-t.wav", wav(tone(1000, 2.0, amp=2000)))
            agent.wait_for(r"event=spool_quarantined entry=\S+ reason=.*not JSON")
            catalog = Catalog(f"sqlite:///{tmp_path / 'store-data' / 'catalog.sqlite3'}")
            wait_for(lambda: any(r.source == "spool" for r in catalog.list()), timeout=60)
            [row] = catalog.list()
            assert row.call_ref == call_ref("r1") and row.customer_masked == "+358401234***"
            assert row.employee_name == "Aino Virtanen" and row.duration_ms == 3000
            assert agent.process is not None and agent.process.poll() is None
        finally:
            assert agent.stop() == 0
        log = agent.text()
        assert "event=spool_started" in log and "event=spool_taken" in log
        assert_no_full_number(tmp_path / "agent-data", log)
    finally:
        store.stop()


# ---------------------------------------------------------------- a burst


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_burst_of_200_files_with_bounded_memory(spool: Spool) -> None:
    """The figure for 1,000: tests/bench/spool_burst.py."""
    peak, stop = [_rss_kb()], threading.Event()
    base = peak[0]

    def sample() -> None:
        while not stop.wait(0.05):
            peak.append(_rss_kb())

    sampler = threading.Thread(target=sample)
    sampler.start()
    pcm = wav(tone(440, 5.0), codec="alaw")
    try:
        for i in range(200):
            rename_in(spool.dir / f"b{i}.wav", pcm[:-2] + struct.pack("<h", i))
            rename_in(spool.dir / f"b{i}.json", sidecar(f"b{i}", {"mixed": f"b{i}.wav"}))
        wait_for(lambda: len(spool.captures()) == 200, timeout=240)
    finally:
        stop.set()
        sampler.join()
    assert spool.quarantined() == []
    assert max(peak) - base < 64 * 1024, f"RSS grew by {(max(peak) - base) // 1024} MiB"
