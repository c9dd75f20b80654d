"""The recorder pool through the SIP front: SIPp (the SRC) → Kamailio (rendered and run
by the agent) → pjsua2 workers → finalize → the store. Every case asserts what the
store holds: parties, employees, channels, times, flags.

Calls of one test run at once (each its own SIPp process), spread by the front over
the module's pool of 8 workers; the RTP of every call comes from one sender in this
process. Load and fault tests are ``slow``."""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from agent.recorder.sip import call_ref
from agent.store.catalog import RecordingRow
from agent.testcall.sipp import (
    DRAFT_NS,
    Midcall,
    Party,
    SippResult,
    SiprecCall,
    cancel_scenario,
    metadata_xml,
    plain_scenario,
    siprec_scenario,
)
from tests.support.audio import Speech, best_correlation, decode, envelope, make_speech, trim
from tests.support.daemons import Daemon, start_store
from tests.support.pool import (
    FULL_NUMBER,
    NATIONAL,
    SERVICE_AOR,
    Pool,
    assert_times,
    employees,
    flags,
    rtp_sender,
    start_pool,
    stop_pool,
)
from tests.support.stack import Keys, make_keys

pytestmark = pytest.mark.sip

WORKERS = 8
CUSTOMER_AOR = f"sip:+{FULL_NUMBER}@pbx.example;user=phone"
AINO = ("e1001", "Aino Virtanen")
MIKKO = ("e1002", "Mikko Korhonen")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pool")


@pytest.fixture(scope="module")
def keys(root: Path) -> Keys:
    return make_keys(root / "keys")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    return make_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def store(root: Path) -> Iterator[tuple[Daemon, str]]:
    (root / "store").mkdir(exist_ok=True)
    daemon, address = start_store(root / "store")
    try:
        yield daemon, address
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def rtp() -> Iterator[tuple[str, int]]:
    with rtp_sender() as address:
        yield address


@pytest.fixture(scope="module")
def pool(
    root: Path, keys: Keys, store: tuple[Daemon, str], speech: Speech, rtp: tuple[str, int]
) -> Iterator[Pool]:
    running = start_pool(
        root / "agent", keys, store[1], root / "store" / "store-data", speech, rtp, WORKERS
    )
    try:
        yield running
    finally:
        stop_pool(running)


@pytest.fixture
def idle(pool: Pool) -> Pool:
    """The pool with every worker in rotation and no call on it."""
    pool.wait_idle()
    return pool


def place_all(pool: Pool, calls: dict[str, str], timeout_s: float = 40.0) -> dict[str, SippResult]:
    """Run each scenario in its own SIPp at once; the results by name."""
    with ThreadPoolExecutor(len(calls)) as executor:
        futures = {
            name: executor.submit(pool.run, scenario, name, timeout_s=timeout_s)
            for name, scenario in calls.items()
        }
        return {name: future.result() for name, future in futures.items()}


def window_rms(
    audio: tuple[int, Sequence[int]], channel: int, start_s: float, end_s: float
) -> float:
    """RMS of one channel of decoded audio between two offsets (seconds)."""
    channels, samples = audio
    mono = samples[channel::channels][int(start_s * 8000) : int(end_s * 8000)]
    return math.sqrt(sum(v * v for v in mono) / max(1, len(mono)))


def carries(path: Path, channel: int, sent: Path, other: Path) -> bool:
    recorded = envelope(path, channel)
    mine = best_correlation(recorded, envelope(sent))
    theirs = best_correlation(recorded, envelope(other))
    return mine > 0.6 and mine > theirs + 0.2


# ---------------------------------------------------------------- what SRCs send


def _variants(pool: Pool) -> dict[str, SiprecCall]:
    return {
        # RFC 7865 document after the SDP, display names, sip: URI with user=phone.
        "rfc": pool.call(customer=CUSTOMER_AOR, customer_name="Asiakas"),
        # Metadata first, no Content-Disposition, a tel: URI, a name-addr AoR.
        "first": pool.call(
            metadata_first=True,
            disposition=False,
            customer="tel:+358-40-123-4567",
            employee='"Aino" <sip:1001@pbx.example>',
        ),
        # The draft namespace with <send> inside <participant>; sips:, national
        # number, outbound, and the customer on the second m-line.
        "draft": pool.call(
            namespace=DRAFT_NS,
            inline_send=True,
            customer=f"sips:{NATIONAL}@pbx.example",
            direction="outbound",
            customer_label="2",
        ),
        "zero_based": pool.call(customer=CUSTOMER_AOR, labels=("0", "1"), customer_label="0"),
        # Word labels, the customer's stream second in the SDP.
        "words": pool.call(
            customer=CUSTOMER_AOR, labels=("agent-leg", "caller-leg"), customer_label="caller-leg"
        ),
        "no_metadata": pool.call(with_metadata=False),
    }


def test_what_srcs_send_is_stored_with_parties_and_channels(
    idle: Pool, speech: Speech, tmp_path: Path
) -> None:
    pool = idle
    calls = {name: replace(call, call_ms=5000) for name, call in _variants(pool).items()}
    scenarios = {name: siprec_scenario(call) for name, call in calls.items()}
    headers = {
        "X-Callrec-Customer": f'"Asiakas" <sip:{NATIONAL}@pbx.example>',
        "X-Callrec-Employee": "<sip:1001@pbx.example>",
        "X-Callrec-Service": "+358 9 876 5432",
        "X-Callrec-Direction": "outbound",
    }
    scenarios["plain"] = plain_scenario(speech.customer, headers, 5000, rtp_via=pool.rtp)
    results = place_all(pool, scenarios)
    for name, result in results.items():
        assert result.ok, (name, result.errors[-1500:])
    rows = pool.stored_many([r.call_id or "" for r in results.values()])
    row = {name: rows[result.call_id or ""] for name, result in results.items()}

    for name in ("rfc", "first", "draft", "zero_based", "words"):
        assert row[name].source == "siprec", name
        assert row[name].customer_masked == "+358401234***", name
        assert row[name].customer_digest, name
        assert employees(row[name]) == [AINO], name
        assert row[name].service_number == "+35898765432", name
        assert row[name].channels == 2, name
        assert flags(row[name]) == set(), (name, row[name].flags)
        assert_times(row[name], results[name].answered_at, results[name].bye_at)
        assert abs(row[name].duration_ms - 5000) <= 500, name
    assert row["draft"].direction == "outbound"
    assert {row[n].direction for n in ("rfc", "first", "zero_based", "words")} == {"inbound"}

    nothing = row["no_metadata"]
    assert nothing.channels == 2 and nothing.customer_masked == "unknown"
    assert (nothing.employee_id, nothing.direction) == ("unknown", "unknown")
    assert flags(nothing) == {
        "metadata_invalid",
        "customer_unknown",
        "employee_unknown",
        "service_unknown",
    }

    plain = row["plain"]
    assert (plain.source, plain.channels, plain.direction) == ("plain", 1, "outbound")
    assert plain.customer_masked == "+358401234***" and employees(plain) == [AINO]
    assert plain.service_number == "+35898765432" and flags(plain) == set()

    # The customer is on the left whichever m-line and label scheme carried them.
    for name in ("rfc", "draft", "words", "no_metadata"):
        audio = pool.export(row[name], tmp_path / f"{name}.ogg")
        assert carries(audio, 0, speech.customer, speech.employee), name
        assert carries(audio, 1, speech.employee, speech.customer), name
    pool.wait_idle()


# ---------------------------------------------------------------- mid-call


def _transfer_doc(partial: bool) -> str:
    """The metadata after a transfer to Mikko (a partial document names only who is on
    the call now)."""
    parties = [
        Party("cHJ0LWN1c3Q=", CUSTOMER_AOR, None, "1"),
        Party("cHJ0LWVtcGwy", "sip:1002@pbx.example", "Mikko", "2"),
    ]
    if not partial:
        parties.insert(1, Party("cHJ0LXN2Yw==", SERVICE_AOR))
    return metadata_xml(parties)


def test_mid_call_changes_are_stored(idle: Pool, speech: Speech, tmp_path: Path) -> None:
    pool = idle
    transfer = _transfer_doc(partial=True)
    calls = {
        "transfer_reinvite": pool.call(call_ms=6000, midcall=(Midcall(2500, metadata=transfer),)),
        "transfer_update": pool.call(
            call_ms=6000, midcall=(Midcall(2500, method="UPDATE", metadata=transfer),)
        ),
        # pjsip refuses an UPDATE without SDP (488); the metadata is used all the same.
        "metadata_only_update": pool.call(
            call_ms=6000,
            midcall=(
                Midcall(2500, method="UPDATE", sdp_direction=None, metadata=transfer, expect=488),
            ),
        ),
        # No metadata in the INVITE; it comes in a re-INVITE.
        "late_metadata": pool.call(
            with_metadata=False,
            call_ms=6000,
            midcall=(Midcall(2000, metadata=_transfer_doc(partial=False)),),
        ),
        "hold": pool.call(
            call_ms=8000,
            midcall=(
                Midcall(2500, sdp_direction="inactive"),
                Midcall(5000, sdp_direction="sendonly"),
            ),
        ),
        "paused_at_start": pool.call(
            call_ms=7000,
            sdp_direction="inactive",
            midcall=(Midcall(3000, sdp_direction="sendonly"),),
        ),
        "session_timer": pool.call(
            call_ms=7000,
            session_expires=90,
            midcall=(Midcall(2000, session_expires=90), Midcall(4000, session_expires=90)),
        ),
    }
    results = place_all(pool, {name: siprec_scenario(call) for name, call in calls.items()})
    for name, result in results.items():
        assert result.ok, (name, result.errors[-1500:])
    rows = pool.stored_many([r.call_id or "" for r in results.values()])
    row = {name: rows[result.call_id or ""] for name, result in results.items()}
    for name, result in results.items():
        assert_times(row[name], result.answered_at, result.bye_at)
        assert row[name].channels == 2, name

    for name in ("transfer_reinvite", "transfer_update", "metadata_only_update"):
        assert employees(row[name]) == [AINO, MIKKO], name
        joined = [e["joined_at"] for e in row[name].employees]
        answered = results[name].answered_at or 0.0
        assert abs(_epoch(joined[0]) - answered) < 0.5, name
        assert abs(_epoch(joined[1]) - (answered + 2.5)) < 0.7, (name, joined)
        assert flags(row[name]) == set(), (name, row[name].flags)
    assert f"event=call_updated recording_id={row['transfer_update'].recording_id}" in pool.text()

    late = row["late_metadata"]
    assert late.customer_masked == "+358401234***" and late.direction == "inbound"
    assert late.service_number == "+35898765432"
    assert employees(late) == [MIKKO] and flags(late) == set()

    hold = decode(pool.export(row["hold"], tmp_path / "hold.ogg"))
    for channel in (0, 1):
        assert window_rms(hold, channel, 0.5, 2.0) > 500, channel
        assert window_rms(hold, channel, 3.0, 4.6) < 30, channel  # paused: silence
        assert window_rms(hold, channel, 5.6, 7.0) > 500, channel
    assert abs(row["hold"].duration_ms - 8000) <= 500

    paused = decode(pool.export(row["paused_at_start"], tmp_path / "paused.ogg"))
    for channel in (0, 1):
        assert window_rms(paused, channel, 0.2, 2.7) < 30, channel  # the timeline starts at answer
        assert window_rms(paused, channel, 3.6, 6.0) > 500, channel
    assert abs(row["paused_at_start"].duration_ms - 7000) <= 500

    refreshed = pool.export(row["session_timer"], tmp_path / "timer.ogg")
    assert carries(refreshed, 0, speech.customer, speech.employee)
    assert carries(refreshed, 1, speech.employee, speech.customer)
    assert flags(row["session_timer"]) == set()
    pool.wait_idle()


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC).timestamp()


# ---------------------------------------------------------------- ends without a normal BYE


def test_cancel_before_answer_records_nothing(idle: Pool) -> None:
    """The workers stall (SIGSTOP) so the SRC's CANCEL reaches one before its answer:
    it sees INVITE and CANCEL together, answers 487 and records nothing; the front
    counts no load for the call afterwards."""
    pool = idle
    pids = pool.worker_pids()
    stored_before = pool.stored_refs()
    with ThreadPoolExecutor(1) as executor:
        for pid in pids.values():
            _signal(pid, signal.SIGSTOP)
        try:
            future = executor.submit(
                pool.run, cancel_scenario(pool.call(), cancel_after_ms=200), "cancel", timeout_s=15
            )
            time.sleep(0.6)
        finally:
            for pid in pids.values():
                _signal(pid, signal.SIGCONT)
        result = future.result()
    assert result.ok, result.errors[-1500:]
    assert result.first is not None and result.first.cancelled_at is not None
    assert result.first.answered_at is None
    ref = call_ref(result.call_id or "")
    _wait_log(pool, f"event=call_ended_unanswered call_ref={ref}")
    assert f"event=call_answered call_ref={ref}" not in pool.text()
    pool.wait_idle()  # no load left on any worker
    time.sleep(1.0)
    assert pool.stored_refs() - stored_before == set()


def test_vanished_src_is_hung_up_after_rtp_silence(idle: Pool, speech: Speech, root: Path) -> None:
    """The SRC stops sending and never says BYE: the worker hangs up (its BYE passes
    the front) after [sip] rtp_timeout (3 s here); what was recorded is stored."""
    pool = idle
    short = Speech(
        trim(speech.customer, root / "c15.wav", 1.5), trim(speech.employee, root / "e15.wav", 1.5)
    )
    call = pool.call(customer_wav=short.customer, employee_wav=short.employee, hangup="srs")
    result = pool.place(call, "vanished", timeout_s=20)
    assert result.ok, result.errors[-1500:]
    assert result.first is not None and result.first.bye_received_at is not None
    row = pool.stored(result.call_id)
    assert flags(row) == {"rtp_timeout"}
    assert_times(row, result.answered_at, result.first.bye_received_at)
    assert 4000 <= row.duration_ms <= 6500, row.duration_ms
    pool.wait_idle()


def test_logs_hold_no_full_number(pool: Pool) -> None:
    """The agent's log (its workers' pjsip lines and Kamailio's, relayed) and every
    file it wrote, after all of the above: no full customer number anywhere."""
    text = pool.text()
    assert "event=front_dispatched" in text and "event=call_answered" in text
    for form in (FULL_NUMBER, NATIONAL, "+358-40-123-4567", "40-123-4567"):
        assert form not in text, form
    for path in (pool.root / "agent-data").rglob("*"):
        if path.is_file() and path.suffix not in (".wav", ".ogg") and not path.is_socket():
            data = path.read_bytes()
            assert FULL_NUMBER.encode() not in data and NATIONAL.encode() not in data, path


# ---------------------------------------------------------------- load (slow)


def _load(pool: Pool, calls: int, name: str) -> tuple[SippResult, dict[str, RecordingRow]]:
    """``calls`` SIPREC calls of 9 s from ONE SIPp at 20 calls/s with real speech;
    refusals (503) end cleanly. Returns SIPp's result and the rows of answered calls."""
    call = pool.call(call_ms=9000, rtp_bind=False, accept_refusal=True)
    result = pool.run(siprec_scenario(call), name, calls=calls, rate=20, timeout_s=60)
    assert result.ok, result.errors[-1500:] + result.stdout[-1500:]
    assert len(result.calls) == calls
    answered = [c.call_id for c in result.calls.values() if c.answered_at is not None]
    return result, pool.stored_many(answered, timeout=90)


def _assert_recorded(
    result: SippResult, rows: dict[str, RecordingRow], pool: Pool, tmp: Path
) -> None:
    """Each answered call: its times, 2 channels of speech, the call's length, no flag."""
    for call_id, row in rows.items():
        log = result.calls[call_id]
        assert_times(row, log.answered_at, log.bye_at)
        assert abs(row.duration_ms - 9000) <= 500, row.duration_ms
        assert row.channels == 2 and flags(row) == set(), row.flags
        channels, samples = audio = decode(pool.export(row, tmp / f"{row.recording_id}.ogg"))
        seconds = len(samples) / channels / 8000
        assert abs(seconds * 1000 - row.duration_ms) <= 300, (seconds, row.duration_ms)
        assert window_rms(audio, 0, 0.5, 7.0) > 500 and window_rms(audio, 1, 0.5, 7.0) > 500


@pytest.mark.slow
def test_load_30_calls_on_8_workers_are_all_recorded(idle: Pool, tmp_path: Path) -> None:
    result, rows = _load(idle, 30, "load30")
    assert len(rows) == 30 and not [c for c in result.calls.values() if c.refused_status]
    _assert_recorded(result, rows, idle, tmp_path)
    dispatched = re.findall(r"event=front_dispatched call_ref=(\S+) worker=(w\d+)", idle.text())
    per_worker = Counter(w for ref, w in dispatched if ref in {r.call_ref for r in rows.values()})
    assert sorted(per_worker.values()) == [3, 3, 4, 4, 4, 4, 4, 4], per_worker
    idle.wait_idle()


@pytest.mark.slow
def test_over_capacity_calls_are_refused_and_the_rest_recorded(idle: Pool, tmp_path: Path) -> None:
    """40 calls on 32 slots: 8 SRC sessions see 503, the 32 others are recorded whole."""
    refused_before = idle.text().count("event=front_refused")
    result, rows = _load(idle, 40, "load40")
    refused = [c for c in result.calls.values() if c.refused_status is not None]
    assert [c.refused_status for c in refused] == [503] * 8
    assert len(rows) == 32
    _assert_recorded(result, rows, idle, tmp_path)
    lines = idle.text().count("event=front_refused")
    assert lines - refused_before == 8
    assert f"refused_total={lines}" in idle.text()
    assert "event=front_failover" not in idle.text()
    idle.wait_idle()  # the refused calls left no load behind


# ---------------------------------------------------------------- a worker dies (slow)


@pytest.fixture
def small_pool(
    root: Path, keys: Keys, store: tuple[Daemon, str], speech: Speech, rtp: tuple[str, int]
) -> Iterator[Pool]:
    """A second agent with two workers (its own front on its own port)."""
    running = start_pool(
        root / f"small-{time.monotonic_ns()}",
        keys,
        store[1],
        root / "store" / "store-data",
        speech,
        rtp,
        2,
        drain="10s",
    )
    try:
        running.wait_idle()
        yield running
    finally:
        stop_pool(running)


@pytest.mark.slow
def test_killed_worker_is_routed_around_and_its_calls_recovered(
    small_pool: Pool, tmp_path: Path
) -> None:
    """Calls alternate over two workers (call load, ties by priority): w0 gets the four
    long ones. w0 is SIGKILLed mid-call and the agent frozen (so that it cannot restart
    w0 yet): once its calls' BYEs have freed it, the front tries w0 for new calls only
    until a probe or an INVITE timed out (1 s probe, 1 s fr_timer), then sends them all
    to w1. Thawed, the agent restarts w0, which recovers the four partial recordings:
    stored flagged incomplete, with the audio up to the kill."""
    pool = small_pool
    first: list[Future[SippResult]] = []
    later: list[tuple[float, Future[SippResult]]] = []
    assert pool.agent.process is not None
    with ThreadPoolExecutor(24) as executor:
        for n in range(8):  # long on w0, short on w1
            call = pool.call(call_ms=4500 if n % 2 == 0 else 2000)
            first.append(executor.submit(pool.place, call, f"first{n}", 20.0))
            time.sleep(0.15)
        time.sleep(2.8)
        _signal(pool.worker_pids()[0], signal.SIGKILL)
        _signal(pool.agent.process.pid, signal.SIGSTOP)
        killed_at = time.time()
        try:
            out_at = _follow(pool, executor, later, killed_at + 4.5)
        finally:
            _signal(pool.agent.process.pid, signal.SIGCONT)
        firsts = [f.result() for f in first]
        afters = [(started, f.result()) for started, f in later]
    bound = killed_at + 1.0 + 1.0 + 0.5  # probe interval + fr_timer + slack
    assert out_at is not None and out_at <= bound, (out_at, killed_at)
    text = pool.text()
    workers = dict(re.findall(r"event=front_dispatched call_ref=(\S+) worker=(w\d)", text))
    failed_over = set(re.findall(r"event=front_failover call_ref=(\S+) worker=w0", text))
    assert len(afters) >= 8
    for started, result in afters:
        assert result.ok and result.answered_at is not None, result.errors[-1500:]
        ref = call_ref(result.call_id or "")
        if started > bound:  # w0 is out of rotation: straight to w1, answered at once
            assert workers[ref] == "w1" and ref not in failed_over, (ref, started - killed_at)
            assert result.answered_at - started < 0.5
    _assert_recovered(pool, firsts, killed_at, tmp_path)
    pool.wait_idle()


def _follow(
    pool: Pool,
    executor: ThreadPoolExecutor,
    later: list[tuple[float, Future[SippResult]]],
    until: float,
) -> float | None:
    """New short calls every 0.5 s until ``until`` (w1 alone can take them, also while
    some wait 1 s on the dead w0); returns when the front first showed
    w0 out of rotation (``kamcmd dispatcher.list``)."""
    out_at: float | None = None
    next_call = time.time() + 0.2
    while time.time() < until:
        if time.time() >= next_call:
            call = pool.call(call_ms=600)
            later.append((time.time(), executor.submit(pool.place, call, "later", 20.0)))
            next_call += 0.5
        if out_at is None and not pool.destinations()[0].active:
            out_at = time.time()
        time.sleep(0.05)
    return out_at


def _assert_recovered(
    pool: Pool, firsts: list[SippResult], killed_at: float, tmp_path: Path
) -> None:
    long_calls, short_calls = firsts[0::2], firsts[1::2]
    for result in short_calls:
        assert result.ok, result.errors[-1500:]
    text = pool.text()
    for result in long_calls:
        assert f"call_ref={call_ref(result.call_id or '')} worker=w0" in text
    rows = pool.stored_many([r.call_id or "" for r in firsts])
    for result in long_calls:
        row = rows[result.call_id or ""]
        assert result.answered_at is not None
        assert flags(row) == {"incomplete"}, row.flags
        assert row.channels == 2
        # The WAV header said 0 bytes; the audio up to the kill was recovered.
        audio = decode(pool.export(row, tmp_path / f"{row.recording_id}.ogg"))
        seconds = len(audio[1]) / audio[0] / 8000
        assert abs(seconds - (killed_at - result.answered_at)) < 0.5, (seconds, killed_at)
        assert window_rms(audio, 0, 0.5, 2.5) > 500 and window_rms(audio, 1, 0.5, 2.5) > 500
        # capture.recover_active stamps ended_at with the WAV's mtime read *after* its
        # header was repaired, i.e. the restart time (reported; not this module's file).
        assert killed_at - 0.5 < row.ended_at_ms / 1000 < killed_at + 8.0
    for result in short_calls:
        assert flags(rows[result.call_id or ""]) == set()
    text = pool.text()
    assert text.count("event=capture_recovered") == 4
    assert "event=worker_died index=0" in text


@pytest.mark.slow
def test_shutdown_drains_calls_through_the_front(small_pool: Pool) -> None:
    """SIGTERM to the agent: new calls are refused (503), the call in progress goes on
    until its BYE (through the front, which stops last) and is stored whole."""
    pool = small_pool
    with ThreadPoolExecutor(2) as executor:
        running = executor.submit(pool.place, pool.call(call_ms=6000), "draining", 20.0)
        time.sleep(2.0)
        assert pool.agent.process is not None
        pool.agent.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = pool.place(pool.call(call_ms=1000, accept_refusal=True), "late", 10.0)
        result = running.result()
    assert result.ok, result.errors[-1500:]
    assert late.first is not None and late.first.refused_status == 503
    assert pool.agent.process.wait(30) == 0
    row = pool.stored(result.call_id)
    assert flags(row) == set() and abs(row.duration_ms - 6000) <= 500
    assert_times(row, result.answered_at, result.bye_at)
    text = pool.text()
    assert "status=503 reason=stopping" in text and "reason=all_refused" in text
    assert text.index("event=worker_stopped") < text.index("event=front_stopped")


# ---------------------------------------------------------------- helpers


def _signal(pid: int, signum: int) -> None:
    os.kill(pid, signum)


def _wait_log(pool: Pool, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in pool.text():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not logged:\n{pool.tail()}")
        time.sleep(0.1)
