"""A recording ends when the front received the BYE (issue 20): a worker starved of
CPU reads the BYE late, and used to record (silence: the sender had stopped) and stamp
the end until it did. The front stamps each BYE it relays (``X-Callrec-Received``,
after removing any such header from outside); the worker ends the call there when the
stamp is sane, and cuts both legs to it.

The pool test stops the one worker's SIP thread (ptrace) before SIPp's BYE and lets it
go on only once the BYE has waited in its socket: the stored recording's length and its decoded
audio are still SIPp's answer → BYE, and a stamp forged by the SRC is ignored."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import os
import re
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent import g711
from agent.capture import cut_wav, leg_seconds
from agent.config import load_agent_config
from agent.recorder.front.edge import MAX_STAMP_AGE_S, RECEIVED_HEADER, call_end, received_stamp
from agent.recorder.front.files import front_files, render_config
from agent.recorder.uplink.live import _leg_digest, _LegDigest
from agent.testcall.sipp import siprec_scenario
from tests.support.audio import decode
from tests.support.pool import Pool, flags, running_pool
from tests.support.stack import Keys, agent_config

UTC = dt.UTC
BYE = (
    "BYE sip:callrec@127.0.0.1:25071 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:25060\r\n"
    "Call-ID: x\r\nCSeq: 3 BYE\r\n{extra}Content-Length: 0\r\n\r\n"
)
CALL_S = 5.0
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000
HOLD_AFTER_BYE_S = 1.5  # the BYE waits this long in the stopped worker's socket


# ---------------------------------------------------------------- the parts


def test_the_front_removes_outside_stamps_and_stamps_each_bye(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip={"front": True, "workers": 2})
    text = render_config(cfg, front_files(cfg))
    route = text.partition("request_route {")[2]
    removed = route.index(f'remove_hf("{RECEIVED_HEADER}");')
    assert removed < route.index("route(IN_DIALOG);")  # before any request is relayed
    in_dialog = text.partition("route[IN_DIALOG] {")[2].partition("\n}\n")[0]
    bye = in_dialog.partition('if (is_method("BYE")) {')[2].partition("}")[0]
    assert f'append_hf("{RECEIVED_HEADER}: $TV(Sn)\\r\\n");' in bye
    assert "t_set_fr(0, 5000);" in bye  # a busy worker's 200 still reaches the SRC


def test_a_stamp_counts_only_from_the_front(tmp_path: Path, keys: Keys) -> None:
    sip = {"front": True, "workers": 2, "worker_port": 25071}
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip_port=25060, sip=sip)
    stamped = BYE.format(extra=f"{RECEIVED_HEADER}: 1796212345.123456\r\n")
    assert received_stamp(cfg.sip, "127.0.0.1:25060", stamped) == 1796212345.123456
    assert received_stamp(cfg.sip, "127.0.0.1:40000", stamped) is None  # not the front
    assert received_stamp(cfg.sip, "127.0.0.1:25060", BYE.format(extra="")) is None
    twice = BYE.format(extra=f"{RECEIVED_HEADER}: 1\r\n{RECEIVED_HEADER}: 2\r\n")
    assert received_stamp(cfg.sip, "127.0.0.1:25060", twice) is None
    answer = "SIP/2.0 200 OK\r\n" + stamped.partition("\r\n")[2]  # to the worker's BYE
    assert received_stamp(cfg.sip, "127.0.0.1:25060", answer) is None  # passed as sent
    for value in ("soon", "999999999999.5", "-1", "1e9"):
        garbage = BYE.format(extra=f"{RECEIVED_HEADER}: {value}\r\n")
        assert received_stamp(cfg.sip, "127.0.0.1:25060", garbage) is None, value
    largest = BYE.format(extra=f"{RECEIVED_HEADER}: 9999999999.999999\r\n")
    stamp = received_stamp(cfg.sip, "127.0.0.1:25060", largest)
    now = dt.datetime.now(UTC)
    assert stamp is not None and call_end(now, stamp, None) == (now, "in_the_future")
    (tmp_path / "direct").mkdir()
    direct, _ = agent_config(tmp_path / "direct", keys, "127.0.0.1:1", sip_port=25060)
    assert received_stamp(direct.sip, "127.0.0.1:25060", stamped) is None  # no front


def test_the_end_is_the_stamp_only_when_it_is_sane() -> None:
    started = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=UTC)
    own = started + dt.timedelta(seconds=30)
    at = own.timestamp()
    assert call_end(own, None, started) == (own, None)
    taken, why = call_end(own, at - 1.25, started)
    assert why is None and (own - taken).total_seconds() == pytest.approx(1.25)
    assert call_end(own, at + 0.5, started) == (own, "in_the_future")
    assert call_end(own, at - MAX_STAMP_AGE_S - 1, started) == (own, "too_old")
    early = started + dt.timedelta(seconds=25)
    assert call_end(early + dt.timedelta(seconds=1), at - 6, early) == (
        early + dt.timedelta(seconds=1),
        "before_answer",
    )


def _wav(path: Path, samples: int) -> Path:
    data = b"\x01\x00" * samples
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16) + b"data"
    path.write_bytes(header + struct.pack("<I", len(data)) + data)
    return path


def test_a_leg_is_cut_to_whole_samples_and_its_header_follows(tmp_path: Path) -> None:
    leg = _wav(tmp_path / "customer.wav", 8000 * 3)
    assert cut_wav(leg, 2.00001) and leg_seconds(leg) == 2.0
    assert leg.stat().st_size == 44 + 32000
    assert struct.unpack_from("<I", leg.read_bytes(), 40)[0] == 32000
    assert not cut_wav(leg, 5.0) and leg_seconds(leg) == 2.0  # shorter already: kept


# ---------------------------------------------------------------- through the front


@pytest.fixture(scope="module", params=["file", "live"])
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    """One worker. No OPTIONS probe while it is stopped: the only SIP datagram reaching
    it then is the BYE (and the front's retransmissions of it). ``live``: the call
    streams to the store every 0.2 s, so the store holds audio from after the BYE when
    the worker cuts the legs (its Finish then names fewer bytes than were sent)."""
    root = tmp_path_factory.mktemp(f"byestamp-{request.param}")
    live = {"live": True, "live_flush": "200ms"} if request.param == "live" else None
    with running_pool(root, workers=1, probe_interval="600s", uplink=live) as running:
        yield running


def _udp_queued(port: int) -> int:
    """Bytes waiting in the receive queue of the UDP socket bound to ``port``."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port:
            return int(fields[4].partition(":")[2], 16)
    raise AssertionError(f"no UDP socket on port {port}")


@contextlib.contextmanager
def _thread_stopped(tid: int) -> Iterator[None]:
    """Stop one thread (ptrace), not its process: the worker's main thread, which reads
    SIP, stands still as on a starved host, while pjsua's media and clock threads go on
    recording (SIGSTOP would stop those too, and the bridge clock skips what it
    missed). Attach, wait and detach run on this one thread, the tracer."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
    if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
        pytest.skip(f"ptrace not permitted here: {os.strerror(ctypes.get_errno())}")
    try:
        assert libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0, ctypes.get_errno()
        os.waitpid(tid, WALL)
        yield
    finally:
        libc.ptrace(PTRACE_DETACH, tid, None, None)


def _wait(condition: str, check: object, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.01)
    return time.time()


@pytest.mark.alone
def test_a_worker_reading_the_bye_late_stores_sipps_answer_to_bye(
    pool: Pool, tmp_path: Path
) -> None:
    pool.wait_idle()
    cfg = load_agent_config(pool.root / "agent.toml")
    active, sip_port = cfg.captures_dir / "active" / "w0", cfg.sip.worker_sip(0)[1]
    worker = pool.worker_pids()[0]
    # The SRC also claims the call ended 3 s early: the front drops that header.
    forged = f"{time.time() + CALL_S - 3.0:.6f}"
    scenario = siprec_scenario(pool.call(call_ms=int(CALL_S * 1000)))
    scenario = scenario.replace(" BYE\n", f" BYE\n{RECEIVED_HEADER}: {forged}\n", 1)
    assert forged in scenario
    with ThreadPoolExecutor(1) as executor:
        placed = executor.submit(pool.run, scenario, "late-bye", timeout_s=40)
        opened = _wait("the call's capture", lambda: active.is_dir() and any(active.iterdir()), 30)
        time.sleep(max(0.0, opened + CALL_S - 1.5 - time.time()))  # well before the BYE
        with _thread_stopped(worker):
            _wait("the BYE at the stopped worker", lambda: _udp_queued(sip_port) > 0, 10)
            time.sleep(HOLD_AFTER_BYE_S)
        result = placed.result()
    assert result.ok, result.errors[-1500:]
    assert result.answered_at is not None and result.bye_at is not None
    sipp_s = result.bye_at - result.answered_at
    row = pool.stored(result.call_id, timeout=60)
    assert abs(row.duration_ms / 1000 - sipp_s) <= 0.2, (row.duration_ms, sipp_s)
    assert abs(row.ended_at_ms / 1000 - result.bye_at) <= 0.2, (row.ended_at_ms, result.bye_at)
    assert flags(row) == set(), row.flags
    channels, samples = decode(pool.export(row, tmp_path / "late.ogg"))
    heard_s = len(samples) / channels / 8000
    assert abs(heard_s - sipp_s) <= 0.2, (heard_s, sipp_s)
    # The worker did read it late (this test would prove nothing otherwise).
    late = re.findall(
        rf"event=bye_read_late recording_id={row.recording_id} late_s=([\d.]+)", pool.text()
    )
    assert late and float(late[0]) >= HOLD_AFTER_BYE_S - 0.1, pool.tail()
    assert "bye_stamp_ignored" not in pool.text()


@pytest.mark.parametrize("encoding", g711.ENCODINGS)
def test_a_live_legs_digest_follows_its_cut(tmp_path: Path, encoding: str) -> None:
    """The live uplink sent a leg's bytes past the end the worker later cut it to: the
    Finish names the cut leg's size and sha256 in the wire's encoding, hashed from a
    mark, not from its start."""
    leg = _wav(tmp_path / "customer.wav", 8000 * 20)
    wire = g711.encode(encoding, leg.read_bytes()[44:])
    width = g711.sample_bytes(encoding)
    sent = _LegDigest()
    step = 800 * width  # 0.1 s appends, as a live_flush would
    for offset in range(0, len(wire), step):
        sent.extend(offset, wire[offset : offset + step])
    assert _leg_digest(leg, encoding, sent) == (len(wire), hashlib.sha256(wire).hexdigest())
    for cut_s in (19.95, 12.3, 0.5):  # within the marks, and past the oldest kept
        cut_wav(leg, cut_s)
        kept = wire[: int(cut_s * 8000) * width]
        assert _leg_digest(leg, encoding, sent) == (len(kept), hashlib.sha256(kept).hexdigest())
