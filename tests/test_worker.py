"""The recorder worker for real: a worker process (pjsua2), SIPp as the SRC, speech as
RTP from one in-process sender, and the captures it leaves in ``captures/ready``."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    MIXED_LEG,
    CaptureMeta,
    Direction,
    Flag,
    parse_iso,
    read_meta,
)
from agent.config import AgentConfig
from agent.recorder.sip import call_ref
from agent.testcall.rtp import ControlServer, RtpSender
from agent.testcall.sipp import (
    MALFORMED_METADATA,
    Party,
    SippResult,
    SiprecCall,
    free_port,
    metadata_xml,
    plain_scenario,
    refused_scenario,
    run_sipp,
    siprec_scenario,
)
from tests.support.audio import (
    CARRIES_AT_LEAST,
    CARRIES_MARGIN,
    Speech,
    carry_scores,
    channel_rms,
    make_speech,
    trim,
)
from tests.support.daemons import REPO
from tests.support.faults import signal_storm
from tests.support.stack import Keys, agent_config, write_toml

pytestmark = pytest.mark.sip

FULL_NUMBER = "358401234567"
NATIONAL = "0401234567"
SERVICE_AOR = "sip:+35898765432@pbx.example"  # "+358 9 876 5432" in stack.SERVICE_NUMBERS


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    return make_speech(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def rtp() -> Iterator[tuple[str, int]]:
    """One sender for every call of this module (what load tests do too)."""
    sender = RtpSender().start()
    server = ControlServer(sender).start()
    try:
        yield server.address
    finally:
        server.stop()
        sender.stop()
        sender.join(5)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    cfg: AgentConfig
    config_path: Path
    log_path: Path

    @property
    def target(self) -> tuple[str, int]:
        return (self.cfg.sip.listen, self.cfg.sip.port)

    @property
    def ready_dir(self) -> Path:
        return self.cfg.captures_dir / "ready"

    @property
    def active_dir(self) -> Path:
        return self.cfg.captures_dir / "active" / "w0"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_worker(
    root: Path, keys: Keys, sip: dict[str, object] | None = None, **sections: dict[str, object]
) -> Worker:
    """A worker process on a free SIP port; returns once it wrote "ready" on its pipe."""
    sip = {"rtp_port_start": free_port(40), "rtp_port_count": 40, **(sip or {})}
    cfg, doc = agent_config(root, keys, "127.0.0.1:1", sip_port=free_port(), sip=sip, **sections)
    config_path = write_toml(root / "agent.toml", doc)
    log_path = root / "worker.log"
    read_fd, write_fd = os.pipe()
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.recorder.worker", "--config", str(config_path),
             "--index", "0", "--ready-fd", str(write_fd)],
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
        )  # fmt: skip
    os.close(write_fd)
    worker = Worker(proc, cfg, config_path, log_path)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20.0)
        line = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    if line != b"ready\n":
        worker.stop(5)
        pytest.fail(f"worker did not become ready ({line!r}):\n{worker.log()}")
    return worker


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    """Workers a test started; all stopped (and killed if need be) at teardown."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture
def worker(tmp_path: Path, keys: Keys, workers: list[Worker]) -> Worker:
    workers.append(start_worker(tmp_path, keys))
    return workers[-1]


def wait_for_capture(worker: Worker, ref: str | None = None, timeout: float = 15.0) -> CaptureMeta:
    """The ready capture of the call with this SIP Call-ID (or the only one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.ready_dir.is_dir():
            for capture in sorted(worker.ready_dir.iterdir()):
                if (capture / "capture.json").exists():
                    meta = read_meta(capture)
                    if ref is None or meta.call_ref == call_ref(ref):
                        return meta
        time.sleep(0.1)
    pytest.fail(f"no capture in {worker.ready_dir} after {timeout}s:\n{worker.log()[-3000:]}")


def assert_no_full_number(worker: Worker) -> None:
    assert FULL_NUMBER not in worker.log()
    assert NATIONAL not in worker.log()
    for path in worker.cfg.data_dir.rglob("*"):
        if path.is_file() and path.suffix != ".wav":
            text = path.read_text(errors="replace")
            assert FULL_NUMBER not in text, path
            assert NATIONAL not in text, path


def assert_times_match(meta: CaptureMeta, result: SippResult) -> None:
    assert result.answered_at is not None and result.bye_at is not None, result.log
    assert meta.ended_at is not None
    assert abs(parse_iso(meta.started_at).timestamp() - result.answered_at) < 0.5
    assert abs(parse_iso(meta.ended_at).timestamp() - result.bye_at) < 0.5


def assert_leg_carries(leg: Path, sent: Path, other: Path) -> None:
    """The leg's loudness contour follows what was sent on it, not the other stream."""
    mine, theirs = carry_scores(leg, 0, sent, other)
    assert channel_rms(leg)[0] > 300, leg
    assert mine > CARRIES_AT_LEAST, (leg.name, mine, theirs)
    assert mine > theirs + CARRIES_MARGIN, (leg.name, mine, theirs)


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        return wav.getnframes() / wav.getframerate()


# ---------------------------------------------------------------- tests


@pytest.mark.alone  # compares the legs with the speech sent: a busy host's late RTP blurs it
@pytest.mark.parametrize(
    ("direction", "customer_label", "customer_aor"),
    [
        ("inbound", "1", f"sip:+{FULL_NUMBER}@pbx.example;user=phone"),
        ("outbound", "2", f"sip:{NATIONAL}@pbx.example"),
    ],
)
def test_siprec_call_is_recorded_leg_by_leg(
    worker: Worker,
    speech: Speech,
    rtp: tuple[str, int],
    tmp_path: Path,
    direction: str,
    customer_label: str,
    customer_aor: str,
) -> None:
    call = SiprecCall(
        speech.customer,
        speech.employee,
        customer=customer_aor,
        service=SERVICE_AOR,
        direction=direction,
        customer_label=customer_label,
        call_ms=8500,
        rtp_via=rtp,
    )
    result = run_sipp(siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=40)
    assert result.ok, result.errors or result.stdout
    meta = wait_for_capture(worker, result.call_id)
    capture = worker.ready_dir / meta.recording_id

    assert meta.source == "siprec"
    assert meta.site == "hel-1"
    assert meta.direction is Direction(direction)
    assert meta.customer.masked == "+358401234***"
    assert meta.customer.tail_sealed
    assert [(e.id, e.name, e.team) for e in meta.employees] == [
        ("e1001", "Aino Virtanen", "parcels")
    ]
    assert meta.service_number == "+35898765432"
    assert meta.flags == ()
    assert meta.legs == (CUSTOMER_LEG, EMPLOYEE_LEG)
    assert_times_match(meta, result)
    for leg in meta.legs:
        assert abs(wav_seconds(capture / leg) - 8.5) < 0.5
    assert_leg_carries(capture / CUSTOMER_LEG, speech.customer, speech.employee)
    assert_leg_carries(capture / EMPLOYEE_LEG, speech.employee, speech.customer)
    assert not any(worker.active_dir.iterdir())
    log = worker.log()
    assert f"event=call_answered call_ref={meta.call_ref} recording_id={meta.recording_id}" in log
    assert 'customer=+358401234*** employee="Aino Virtanen" service=+35898765432' in log
    assert f"event=call_recorded recording_id={meta.recording_id}" in log
    assert_no_full_number(worker)


def test_calls_with_bad_or_partial_metadata_are_recorded_and_flagged(
    worker: Worker, speech: Speech, rtp: tuple[str, int], tmp_path: Path
) -> None:
    base = SiprecCall(speech.customer, speech.employee, service=SERVICE_AOR, call_ms=3000,
                      rtp_via=rtp)  # fmt: skip
    variants = {
        "malformed": replace(base, metadata=MALFORMED_METADATA),
        "no_metadata": replace(base, with_metadata=False),
        "withheld": replace(base, customer="sip:anonymous@anonymous.invalid"),
        "unknown_employee": replace(base, employee="sip:1099@pbx.example"),
    }
    with ThreadPoolExecutor(len(variants)) as pool:  # four calls at once: a full worker
        futures = {
            name: pool.submit(
                run_sipp,
                siprec_scenario(replace(call, rtp_ports=(free_port(), free_port()))),
                worker.target,
                tmp_path / name,
                timeout_s=30,
            )
            for name, call in variants.items()
        }
        results = {name: future.result() for name, future in futures.items()}
    metas: dict[str, CaptureMeta] = {}
    for name, result in results.items():
        assert result.ok, (name, result.errors or result.stdout)
        metas[name] = wait_for_capture(worker, result.call_id)
        assert metas[name].legs == (CUSTOMER_LEG, EMPLOYEE_LEG), name
        assert_times_match(metas[name], result)

    assert Flag.METADATA_INVALID in metas["malformed"].flags
    assert Flag.METADATA_MISSING in metas["no_metadata"].flags
    assert Flag.METADATA_INVALID not in metas["no_metadata"].flags
    for name in ("malformed", "no_metadata"):
        meta = metas[name]
        assert meta.customer.masked == "unknown"
        assert meta.direction is Direction.UNKNOWN
        # Without metadata the m-line order decides: label 1 (customer speech) is first.
        capture = worker.ready_dir / meta.recording_id
        assert_leg_carries(capture / CUSTOMER_LEG, speech.customer, speech.employee)

    withheld = metas["withheld"]
    assert withheld.flags == (Flag.CUSTOMER_WITHHELD,)
    assert withheld.customer.masked == "anonymous"
    assert withheld.direction is Direction.INBOUND
    assert withheld.employees[0].name == "Aino Virtanen"

    unknown = metas["unknown_employee"]
    assert unknown.flags == (Flag.EMPLOYEE_UNKNOWN,)
    assert [(e.id, e.name, e.aor) for e in unknown.employees] == [
        ("unknown", "unknown", "sip:1099@pbx.example")
    ]
    assert unknown.customer.masked == "+358401234***"

    log = worker.log()
    assert log.count("event=metadata_invalid") == 1
    assert log.count("event=metadata_missing") == 1
    assert f"event=employee_unknown recording_id={unknown.recording_id}" in log
    assert_no_full_number(worker)


def test_plain_invite_is_recorded_mixed_with_parties_from_headers(
    keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int], tmp_path: Path
) -> None:
    worker = start_worker(tmp_path, keys, sip={"plain": True})
    workers.append(worker)
    headers = {
        "X-Callrec-Customer": f"<sip:{NATIONAL}@pbx.example>",
        "X-Callrec-Employee": "<sip:1001@pbx.example>",
        "X-Callrec-Service": "+358 9 876 5432",
    }
    scenario = plain_scenario(speech.customer, headers, call_ms=3000, rtp_via=rtp)
    result = run_sipp(scenario, worker.target, tmp_path / "sipp", timeout_s=30)
    assert result.ok, result.errors or result.stdout
    meta = wait_for_capture(worker, result.call_id)
    assert meta.source == "plain"
    assert meta.legs == (MIXED_LEG,)
    assert meta.customer.masked == "+358401234***"
    assert meta.employees[0].id == "e1001"
    assert meta.service_number == "+35898765432"
    assert channel_rms(worker.ready_dir / meta.recording_id / MIXED_LEG)[0] > 300
    assert_no_full_number(worker)


def test_vanished_sender_is_hung_up_after_the_rtp_timeout(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    workers.append(start_worker(tmp_path, keys, sip={"rtp_timeout": "2s"}))
    worker = workers[-1]
    short = Speech(
        trim(speech.customer, tmp_path / "c.wav", 1.5),
        trim(speech.employee, tmp_path / "e.wav", 1.5),
    )
    call = SiprecCall(short.customer, short.employee, service=SERVICE_AOR, call_ms=20000,
                      rtp_via=rtp)  # fmt: skip
    started = time.monotonic()
    meta = None
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            run_sipp, siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=30
        )
        meta = wait_for_capture(worker, timeout=15)
        assert time.monotonic() - started < 10
        future.result()  # SIPp gets the BYE mid-pause: its call fails, which is fine
    assert Flag.RTP_TIMEOUT in meta.flags
    assert meta.ended_at is not None
    duration = (parse_iso(meta.ended_at) - parse_iso(meta.started_at)).total_seconds()
    assert 3.0 < duration < 6.5
    assert channel_rms(worker.ready_dir / meta.recording_id / CUSTOMER_LEG)[0] > 300
    assert f"event=rtp_timeout recording_id={meta.recording_id}" in worker.log()


def _wait_active(worker: Worker, timeout: float = 10.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(worker.active_dir.glob("*/capture.json"))
        if found:
            return found[0].parent
        time.sleep(0.05)
    pytest.fail(f"no active capture:\n{worker.log()}")


def test_sigterm_refuses_new_calls_and_finishes_the_call_in_progress(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    workers.append(start_worker(tmp_path, keys, sip={"drain": "2s"}))
    worker = workers[-1]
    call = SiprecCall(speech.customer, speech.employee, call_ms=20000, rtp_via=rtp)
    with ThreadPoolExecutor(2) as pool:
        pool.submit(run_sipp, siprec_scenario(call), worker.target, tmp_path / "a", timeout_s=25)
        _wait_active(worker)
        time.sleep(1.0)
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = replace(call, call_ms=1000, rtp_ports=(free_port(), free_port()))
        refused = pool.submit(
            run_sipp, siprec_scenario(late), worker.target, tmp_path / "b", timeout_s=10
        ).result()
        assert worker.proc.wait(15) == 0, worker.log()
    assert not refused.ok
    assert "status=503 reason=stopping" in worker.log()
    meta = wait_for_capture(worker, timeout=1)
    assert meta.ended_at is not None and Flag.INCOMPLETE not in meta.flags
    duration = (parse_iso(meta.ended_at) - parse_iso(meta.started_at)).total_seconds()
    assert 2.5 < duration < 6.0  # ~1.2 s of call, then the 2 s drain
    capture = worker.ready_dir / meta.recording_id
    assert wav_seconds(capture / CUSTOMER_LEG) > 2.5
    assert_leg_carries(capture / CUSTOMER_LEG, speech.customer, speech.employee)
    assert_leg_carries(capture / EMPLOYEE_LEG, speech.employee, speech.customer)
    assert not any(worker.active_dir.iterdir())


def test_capture_of_a_killed_worker_is_recovered_on_restart(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    workers.append(start_worker(tmp_path, keys))
    first = workers[-1]
    call = SiprecCall(speech.customer, speech.employee, call_ms=3000, rtp_via=rtp)
    with ThreadPoolExecutor(1) as pool:
        sipp = pool.submit(
            run_sipp, siprec_scenario(call), first.target, tmp_path / "sipp", timeout_s=8
        )
        active = _wait_active(first)
        time.sleep(2.0)
        first.proc.kill()
        first.proc.wait(5)
        sipp.result()
    assert (active / CUSTOMER_LEG).exists()

    workers.append(start_worker(tmp_path, keys))
    second = workers[-1]
    meta = wait_for_capture(second, timeout=5)
    assert meta.recording_id == active.name
    assert Flag.INCOMPLETE in meta.flags
    assert meta.ended_at is not None
    seconds = wav_seconds(second.ready_dir / meta.recording_id / CUSTOMER_LEG)
    assert 1.0 < seconds < 3.5
    assert f"event=capture_recovered recording_id={meta.recording_id}" in second.log()


def test_sighup_reloads_the_directory_and_log_level_and_keeps_the_old_if_broken(
    tmp_path: Path, keys: Keys, workers: list[Worker]
) -> None:
    workers.append(start_worker(tmp_path, keys))
    worker = workers[-1]
    people = worker.cfg.directory_file
    good = people.read_text()
    people.write_text("[[person]]\nid = ")
    worker.proc.send_signal(signal.SIGHUP)
    _wait_log(worker, "event=directory_reload_failed")
    people.write_text(good.replace("Aino Virtanen", "Aino Korhonen"))
    worker.proc.send_signal(signal.SIGHUP)
    _wait_log(worker, "event=directory_reloaded")
    assert "event=directory_unchanged" not in worker.log()  # a debug line, level is info
    config = worker.config_path.read_text()
    worker.config_path.write_text(config + '\n[log]\nlevel = "debug"\n')
    worker.proc.send_signal(signal.SIGHUP)  # the directory, then the level
    _wait_log(worker, "event=reloaded worker=0 log_level=debug")
    worker.proc.send_signal(signal.SIGHUP)
    _wait_log(worker, "event=directory_unchanged")
    assert worker.proc.poll() is None


def test_second_sigterm_exits_at_once_and_the_capture_stays_recoverable(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    workers.append(start_worker(tmp_path, keys, sip={"drain": "30s"}))
    worker = workers[-1]
    call = SiprecCall(speech.customer, speech.employee, call_ms=2000, rtp_via=rtp)
    with ThreadPoolExecutor(1) as pool:
        sipp = pool.submit(
            run_sipp, siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=6
        )
        active = _wait_active(worker)
        worker.proc.send_signal(signal.SIGTERM)
        _wait_log(worker, "event=worker_draining")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(3) == 1
        sipp.result()
    assert (active / "capture.json").exists()  # left for the next start to recover


def _wait_log(worker: Worker, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log():
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not logged:\n{worker.log()}")
        time.sleep(0.05)


def test_parent_death_signal_drains_however_often_it_comes(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    """The kernel's parent-death signal (SIGUSR2, once per exiting agent thread) arrives
    three times mid-call: the worker stops taking calls, records the call to its BYE and
    exits 0; nothing is cut (a second SIGTERM would have exited at once)."""
    workers.append(start_worker(tmp_path, keys, sip={"drain": "30s"}))
    worker = workers[-1]
    call = SiprecCall(speech.customer, speech.employee, call_ms=4000, rtp_via=rtp)
    with ThreadPoolExecutor(1) as pool:
        sipp = pool.submit(
            run_sipp, siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=10
        )
        _wait_active(worker)
        for _ in range(3):
            worker.proc.send_signal(signal.SIGUSR2)
            time.sleep(0.05)
        _wait_log(worker, "event=agent_gone worker=0 calls=1 action=drain_then_exit")
        result = sipp.result()
        assert worker.proc.wait(15) == 0, worker.log()
    assert result.ok, result.errors[-1500:]
    meta = wait_for_capture(worker, timeout=1)
    assert Flag.INCOMPLETE not in meta.flags
    assert_times_match(meta, result)
    assert worker.log().count("event=agent_gone") == 1


@pytest.mark.slow
def test_a_storm_of_signals_while_draining_never_wedges_the_worker(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    """Signals arriving while a handler runs (the kernel's parent-death signal comes
    once per exiting agent thread, a SIGHUP for a directory change on top): the
    worker still drains its call, answers the BYE and exits 0. A handler that took a
    lock (``threading.Event.set``) deadlocked here on the lock its own interrupted
    handler held (seen after ``kill -9`` of the agent, tests/test_agent_killed.py)."""
    workers.append(start_worker(tmp_path, keys, sip={"drain": "30s"}))
    worker = workers[-1]
    call = SiprecCall(speech.customer, speech.employee, call_ms=4000, rtp_via=rtp)
    with ThreadPoolExecutor(1) as pool:
        sipp = pool.submit(
            run_sipp, siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=12
        )
        _wait_active(worker)
        sent = signal_storm(worker.proc.pid, (signal.SIGUSR2, signal.SIGHUP), seconds=1.5)
        assert sent > 1000
        result = sipp.result()
        try:
            code = worker.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker hangs after {sent} signals:\n{worker.log()[-3000:]}")
    assert code == 0, worker.log()[-3000:]
    assert result.ok, result.errors[-1500:]
    meta = wait_for_capture(worker, timeout=1)
    assert Flag.INCOMPLETE not in meta.flags
    assert_times_match(meta, result)
    assert worker.log().count("event=agent_gone") == 1


# ---------------------------------------------------------------- the SIP edge


def _no_capture(worker: Worker) -> None:
    for directory in (worker.ready_dir, worker.active_dir):
        assert not directory.is_dir() or not any(directory.iterdir()), directory


def _large_metadata(size: int) -> str:
    """A metadata document of about ``size`` bytes: the call's parties, then more
    participants (a conference, queues), as SBCs send them."""
    doc = metadata_xml(
        [
            Party("cHJ0LWN1c3Q=", f"sip:+{FULL_NUMBER}@pbx.example", "Asiakas", "1"),
            Party("cHJ0LWVtcGw=", "sip:1001@pbx.example", "Aino Virtanen", "2"),
        ]
    ).removesuffix("</recording>\n")
    extra = []
    while len(doc) + sum(map(len, extra)) < size:
        extra.append(
            f'<participant participant_id="eHRyYS{len(extra):04d}"><nameID '
            f'aor="sip:queue-{len(extra)}@pbx.example"><name>Jono {len(extra)}</name>'
            "</nameID></participant>\n"
        )
    return doc + "".join(extra) + "</recording>\n"


def test_an_invite_longer_than_pjsip_reads_is_refused_513_and_nothing_recorded(
    worker: Worker, speech: Speech, tmp_path: Path
) -> None:
    """Without the front, pjsip reads ~4,000 bytes of a UDP datagram: a 6 KB INVITE
    reaches the worker cut (its multipart without the close delimiter). It is answered
    513, never 200 with the parties unknown and both channels silent."""
    call = SiprecCall(speech.customer, speech.employee, metadata=_large_metadata(5500))
    result = run_sipp(refused_scenario(call, 513), worker.target, tmp_path / "big", timeout_s=15)
    assert result.ok and result.first is not None, result.errors or result.stdout
    assert result.first.refused_status == 513
    _wait_log(worker, f"call_ref={call_ref(result.call_id or '')} status=513")
    assert "event=invite_truncated" in worker.log()
    assert "event=call_answered" not in worker.log()
    _no_capture(worker)
    assert_no_full_number(worker)


def test_unlisted_client_and_plain_invites_are_refused_with_403(
    keys: Keys, workers: list[Worker], speech: Speech, tmp_path: Path
) -> None:
    """A worker without the front checks the INVITE's source address itself; plain
    INVITEs (X-Callrec-* headers, no SIPREC) need ``[sip] plain = true``."""
    worker = start_worker(tmp_path, keys, sip={"allowed_clients": ["127.0.0.1"]})
    workers.append(worker)
    call = SiprecCall(speech.customer, speech.employee)
    runs = {
        "stranger": ("127.0.0.2", refused_scenario(call, 403)),
        "plain": ("127.0.0.1", refused_scenario(call, 403, plain=True)),
    }
    for name, (source, scenario) in runs.items():
        result = run_sipp(scenario, worker.target, tmp_path / name, timeout_s=15, local_ip=source)
        assert result.ok, (name, result.errors or result.stdout)
        assert result.first is not None and result.first.refused_status == 403
    _no_capture(worker)
    log = worker.log()
    assert "status=403 reason=client_not_allowed source=127.0.0.2" in log
    assert "status=403 reason=plain_not_enabled source=127.0.0.1" in log
    assert_no_full_number(worker)


def test_client_behind_the_front_must_come_through_the_front(
    keys: Keys, workers: list[Worker], speech: Speech, tmp_path: Path
) -> None:
    """With ``front = true`` a worker takes INVITEs only from the front's address and
    port: an SRC that reaches the worker's port directly is refused."""
    sip: dict[str, object] = {"front": True, "port": free_port(), "worker_port": free_port()}
    worker = start_worker(tmp_path, keys, sip=sip)
    workers.append(worker)
    target = worker.cfg.sip.worker_sip(0)
    call = SiprecCall(speech.customer, speech.employee)
    result = run_sipp(refused_scenario(call, 403), target, tmp_path / "direct", timeout_s=15)
    assert result.ok, result.errors or result.stdout
    _no_capture(worker)
    assert "status=403 reason=not_from_front source=127.0.0.1" in worker.log()


def _threads(pid: int) -> list[str]:
    return sorted(
        (task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()
    )


def _wait_without(pid: int, thread: str, timeout: float = 3.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while thread in (names := _threads(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return names


def test_the_bridge_clock_stops_when_idle_and_the_next_call_is_recorded(
    worker: Worker, speech: Speech, rtp: tuple[str, int], tmp_path: Path
) -> None:
    """pjsua closes the bridge's 20 ms clock a second after start-up and after each
    call (an idle worker would wake 50 times a second for nothing); each call's
    recorders reopen it and the call is recorded whole, with its audio."""
    assert "clock" not in _wait_without(worker.proc.pid, "clock")
    for n in range(2):
        call = SiprecCall(
            speech.customer, speech.employee, service=SERVICE_AOR, call_ms=3000, rtp_via=rtp
        )
        result = run_sipp(siprec_scenario(call), worker.target, tmp_path / f"sipp{n}", timeout_s=40)
        assert result.ok, result.errors or result.stdout
        meta = wait_for_capture(worker, result.call_id)
        capture = worker.ready_dir / meta.recording_id
        for leg in meta.legs:
            assert abs(wav_seconds(capture / leg) - 3.0) < 0.5
            assert channel_rms(capture / leg)[0] > 300, (n, leg)  # audio, not silence
        assert "clock" not in _wait_without(worker.proc.pid, "clock")


def _clock_wakeups(pid: int) -> int | None:
    """The bridge clock thread's voluntary context switches (its sleeps), if it runs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == "clock":
                status = (task / "status").read_text()
                return int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return None


@pytest.mark.alone  # counts a thread's wake-ups per second: a busy host skews them
@pytest.mark.parametrize(("frame_ms", "ticks_per_s"), [(None, 25), (20, 50)])
def test_the_bridge_clock_ticks_once_per_frame_and_the_call_is_recorded_whole(
    tmp_path: Path,
    keys: Keys,
    workers: list[Worker],
    speech: Speech,
    rtp: tuple[str, int],
    frame_ms: int | None,
    ticks_per_s: int,
) -> None:
    """``[sip] frame_ms`` (40 unless set): the bridge's clock wakes once per frame while
    a call is up (25 times a second by default, 50 at 20 ms), and the call is recorded
    whole, with its audio, either way."""
    workers.append(start_worker(tmp_path, keys, {"frame_ms": frame_ms} if frame_ms else None))
    worker = workers[-1]
    call = SiprecCall(
        speech.customer, speech.employee, service=SERVICE_AOR, call_ms=5000, rtp_via=rtp
    )
    with ThreadPoolExecutor(1) as pool:
        placed = pool.submit(
            run_sipp, siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=40
        )
        deadline = time.monotonic() + 20
        while (before := _clock_wakeups(worker.proc.pid)) is None:
            assert time.monotonic() < deadline, "the bridge clock never started"
            time.sleep(0.05)
        time.sleep(2.0)  # a window to count in, not an ordering
        after = _clock_wakeups(worker.proc.pid)
        result = placed.result()
    assert after is not None, "the clock stopped within 2 s of the call's start"
    per_s = (after - before) / 2.0
    # A late clock catches up without sleeping, so a loaded host gives fewer, never more.
    assert ticks_per_s * 0.4 <= per_s <= ticks_per_s * 1.3, per_s
    assert result.ok, result.errors or result.stdout
    meta = wait_for_capture(worker, result.call_id)
    for leg in meta.legs:
        assert abs(wav_seconds(worker.ready_dir / meta.recording_id / leg) - 5.0) < 0.5
        assert channel_rms(worker.ready_dir / meta.recording_id / leg)[0] > 300, leg


def test_without_the_media_thread_an_idle_worker_sleeps_and_calls_are_recorded(
    tmp_path: Path, keys: Keys, workers: list[Worker], speech: Speech, rtp: tuple[str, int]
) -> None:
    """``[sip] media_thread = false``: no pjmedia thread polling every 10 ms; the
    worker's own thread reads RTP, and a call is recorded whole, with its audio."""
    for name in ("with", "without"):
        (tmp_path / name).mkdir()
    workers.append(start_worker(tmp_path / "with", keys))
    assert "media" in _threads(workers[-1].proc.pid)
    workers.append(start_worker(tmp_path / "without", keys, {"media_thread": False}))
    worker = workers[-1]
    assert "media" not in _wait_without(worker.proc.pid, "clock")
    call = SiprecCall(
        speech.customer, speech.employee, service=SERVICE_AOR, call_ms=3000, rtp_via=rtp
    )
    result = run_sipp(siprec_scenario(call), worker.target, tmp_path / "sipp", timeout_s=40)
    assert result.ok, result.errors or result.stdout
    meta = wait_for_capture(worker, result.call_id)
    for leg in meta.legs:
        assert abs(wav_seconds(worker.ready_dir / meta.recording_id / leg) - 3.0) < 0.5
        assert channel_rms(worker.ready_dir / meta.recording_id / leg)[0] > 300, leg
    assert meta.flags == ()


def test_worker_process_is_not_dumpable(worker: Worker) -> None:
    """PR_SET_DUMPABLE 0 (no core file, no ptrace by our own user), read back by the
    worker with PR_GET_DUMPABLE; unless we are root, its /proc files then belong to
    root."""
    assert "event=core_dumps_off worker=0 dumpable=0" in worker.log()
    if os.getuid() != 0:
        assert Path(f"/proc/{worker.proc.pid}/status").stat().st_uid == 0


def _siprec_invite(target: tuple[str, int], local: tuple[str, int], call_id: str) -> bytes:
    metadata = SiprecCall(Path("c.wav"), Path("e.wav"), service=SERVICE_AOR).metadata_document()
    sdp = (
        f"v=0\r\no=- 1 1 IN IP4 {local[0]}\r\ns=-\r\nc=IN IP4 {local[0]}\r\nt=0 0\r\n"
        f"m=audio {free_port()} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=label:1\r\na=sendonly\r\n"
        f"m=audio {free_port()} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na=label:2\r\na=sendonly\r\n"
    )
    body = (
        f"--b\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n"
        f"--b\r\nContent-Type: application/rs-metadata+xml\r\n\r\n{metadata}\r\n--b--\r\n"
    )
    head = (
        f"INVITE sip:srs@{target[0]}:{target[1]} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK-noack\r\n"
        f"From: <sip:src@{local[0]}>;tag=noack\r\nTo: <sip:srs@{target[0]}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:src@{local[0]}:{local[1]}>\r\nRequire: siprec\r\n"
        f"Content-Type: multipart/mixed;boundary=b\r\nContent-Length: {len(body.encode())}\r\n"
    )
    return (head + "\r\n" + body).encode()


@pytest.mark.slow
def test_a_call_whose_200_is_never_acknowledged_is_flagged(
    keys: Keys, workers: list[Worker], tmp_path: Path
) -> None:
    """An SRC that never ACKs our 200 (it never learnt the call is recorded): the
    capture is kept, flagged ``not_acknowledged``, not stored as a normal call."""
    worker = start_worker(tmp_path, keys, sip={"rtp_timeout": "2s"})
    workers.append(worker)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        call_id = f"noack-{time.monotonic_ns()}"
        sock.sendto(_siprec_invite(worker.target, sock.getsockname(), call_id), worker.target)
        answered = False
        deadline = time.monotonic() + 5
        while not answered and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                answered = sock.recv(65535).startswith(b"SIP/2.0 200")
        assert answered, worker.log()[-2000:]
        meta = wait_for_capture(worker, call_id, timeout=45)
    assert Flag.NOT_ACKNOWLEDGED in meta.flags
    assert f"event=call_not_acknowledged recording_id={meta.recording_id}" in worker.log()


def _refused_status(worker: Worker, call_id: str, changes: dict[bytes, bytes]) -> bytes:
    """Send an INVITE changed by ``changes`` (Content-Length fixed up); the final
    4xx/5xx status line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        invite = _siprec_invite(worker.target, sock.getsockname(), call_id)
        for old, new in changes.items():
            invite = invite.replace(old, new)
        head, _, body = invite.partition(b"\r\n\r\n")
        head = head.rsplit(b"Content-Length: ", 1)[0] + f"Content-Length: {len(body)}".encode()
        sock.sendto(head + b"\r\n\r\n" + body, worker.target)
        status = b""
        deadline = time.monotonic() + 5
        while not status.startswith((b"SIP/2.0 4", b"SIP/2.0 5")) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                status = sock.recv(65535)
    return status.partition(b"\r\n")[0]


def test_worker_that_refused_calls_stops_cleanly(worker: Worker) -> None:
    """Refused INVITEs (no audio to record: ours; no codec in common: pjsua's own
    488) leave nothing that aborts pjsua at shutdown (``pjsua_call_set_user_data:
    Assertion call_id>=0`` was seen)."""
    video = {b"m=audio": b"m=video", b"PCMA/8000": b"H264/90000"}
    assert _refused_status(worker, "no-audio", video).startswith(b"SIP/2.0 488")
    g729 = {b"RTP/AVP 8": b"RTP/AVP 18", b"8 PCMA/8000": b"18 G729/8000"}
    assert _refused_status(worker, "no-codec", g729).startswith((b"SIP/2.0 4", b"SIP/2.0 5"))
    assert worker.stop() == 0, worker.log()[-3000:]
    assert "Assertion" not in worker.log()
