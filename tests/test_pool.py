"""The recorder pool through the SIP front: SIPp (the SRC) → Kamailio (rendered and run
by the agent) → pjsua2 workers → finalize → the store. Every case asserts what the
store holds: parties, employees, channels, times, flags.

Calls of one test run at once (each its own SIPp process), spread by the front over
the module's pool of 8 workers; the RTP of every call comes from one sender in this
process. Load and fault tests are in test_pool_load.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from agent.recorder.sip import call_ref
from agent.store.catalog import RecordingRow
from agent.testcall.sipp import (
    DRAFT_NS,
    Midcall,
    Party,
    SiprecCall,
    cancel_scenario,
    metadata_xml,
    plain_scenario,
    siprec_scenario,
)
from tests.support.audio import Speech, carries, decode, trim
from tests.support.pool import (
    FULL_NUMBER,
    NATIONAL,
    SERVICE_AOR,
    Pool,
    assert_times,
    employees,
    epoch,
    flags,
    place_and_store,
    running_pool,
    wait_log,
    window_rms,
)

pytestmark = pytest.mark.sip

CUSTOMER_AOR = f"sip:+{FULL_NUMBER}@pbx.example;user=phone"
AINO = ("e1001", "Aino Virtanen")
MIKKO = ("e1002", "Mikko Korhonen")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with running_pool(tmp_path_factory.mktemp("pool"), workers=8, plain=True) as running:
        yield running


@pytest.fixture
def idle(pool: Pool) -> Pool:
    """The pool with every worker in rotation and no call on it."""
    pool.wait_idle()
    return pool


@pytest.fixture
def speech(pool: Pool) -> Speech:
    return pool.speech


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
        # The SRC over TCP (a SIPREC INVITE is larger than an MTU); workers get UDP.
        "tcp": pool.call(customer=CUSTOMER_AOR),
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
    _, row = place_and_store(pool, scenarios)
    for name in ("rfc", "first", "draft", "zero_based", "words", "tcp"):
        assert (row[name].source, row[name].channels) == ("siprec", 2), name
        assert row[name].customer_masked == "+358401234***" and row[name].customer_tail_sealed
        assert employees(row[name]) == [AINO], name
        assert row[name].service_number == "+35898765432", name
        assert flags(row[name]) == set(), (name, row[name].flags)
        assert abs(row[name].duration_ms - 5000) <= 500, name
    assert row["draft"].direction == "outbound"
    assert {row[n].direction for n in ("rfc", "first", "zero_based", "words")} == {"inbound"}

    nothing = row["no_metadata"]
    assert nothing.channels == 2 and nothing.customer_masked == "unknown"
    assert (nothing.employee_id, nothing.direction) == ("unknown", "unknown")
    unknown = {"metadata_missing", "customer_unknown", "employee_unknown", "service_unknown"}
    assert flags(nothing) == unknown

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


def _midcall_calls(pool: Pool) -> dict[str, SiprecCall]:
    transfer = _transfer_doc(partial=True)
    return {
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
            call_ms=8000, midcall=(Midcall(2500, sdp_direction="inactive"), Midcall(5000))
        ),
        "paused_at_start": pool.call(
            call_ms=7000, sdp_direction="inactive", midcall=(Midcall(3000),)
        ),
        "session_timer": pool.call(
            call_ms=7000,
            session_expires=90,
            midcall=(Midcall(2000, session_expires=90), Midcall(4000, session_expires=90)),
        ),
    }


def test_mid_call_changes_are_stored(idle: Pool, speech: Speech, tmp_path: Path) -> None:
    pool = idle
    calls = _midcall_calls(pool)
    results, row = place_and_store(
        pool, {name: siprec_scenario(call) for name, call in calls.items()}
    )
    for name in ("transfer_reinvite", "transfer_update", "metadata_only_update"):
        assert employees(row[name]) == [AINO, MIKKO], name
        joined = [epoch(e["joined_at"]) for e in row[name].employees]
        answered = results[name].answered_at or 0.0
        assert abs(joined[0] - answered) < 0.5 and abs(joined[1] - answered - 2.5) < 0.7, name
        assert flags(row[name]) == set() and row[name].channels == 2, (name, row[name].flags)
    assert f"event=call_updated recording_id={row['transfer_update'].recording_id}" in pool.text()

    late = row["late_metadata"]
    assert late.customer_masked == "+358401234***" and late.direction == "inbound"
    assert late.service_number == "+35898765432"
    assert employees(late) == [MIKKO] and flags(late) == set()

    _assert_pauses(pool, row, tmp_path)
    refreshed = pool.export(row["session_timer"], tmp_path / "timer.ogg")
    assert carries(refreshed, 0, speech.customer, speech.employee)
    assert carries(refreshed, 1, speech.employee, speech.customer)
    assert flags(row["session_timer"]) == set()
    pool.wait_idle()


def _assert_pauses(pool: Pool, row: dict[str, RecordingRow], tmp_path: Path) -> None:
    """a=inactive keeps the timeline: silence while paused, speech around it."""
    hold = decode(pool.export(row["hold"], tmp_path / "hold.ogg"))
    for channel in (0, 1):
        assert window_rms(hold, channel, 0.5, 2.0) > 500, channel
        assert window_rms(hold, channel, 3.0, 4.6) < 30, channel
        assert window_rms(hold, channel, 5.6, 7.0) > 500, channel
    assert abs(row["hold"].duration_ms - 8000) <= 500 and flags(row["hold"]) == {"paused"}
    assert [p["who"] for p in row["hold"].pauses] == ["src"]  # the SRC's a=inactive, marked

    paused = decode(pool.export(row["paused_at_start"], tmp_path / "paused.ogg"))
    for channel in (0, 1):
        assert window_rms(paused, channel, 0.2, 2.7) < 30, channel  # from the answer on
        assert window_rms(paused, channel, 3.6, 6.0) > 500, channel
    assert abs(row["paused_at_start"].duration_ms - 7000) <= 500
    assert [p["who"] for p in row["paused_at_start"].pauses] == ["src"]


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
    wait_log(pool, f"event=call_ended_unanswered call_ref={ref}")
    assert f"event=call_answered call_ref={ref}" not in pool.text()
    pool.wait_idle()  # no load left on any worker
    time.sleep(1.0)
    assert pool.stored_refs() - stored_before == set()


def test_vanished_src_is_hung_up_after_rtp_silence(
    idle: Pool, speech: Speech, tmp_path: Path
) -> None:
    """The SRC stops sending and never says BYE: the worker hangs up (its BYE passes
    the front) after [sip] rtp_timeout (3 s here); what was recorded is stored."""
    pool = idle
    short = Speech(
        trim(speech.customer, tmp_path / "c.wav", 1.5),
        trim(speech.employee, tmp_path / "e.wav", 1.5),
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


# ---------------------------------------------------------------- helpers


def _signal(pid: int, signum: int) -> None:
    os.kill(pid, signum)
