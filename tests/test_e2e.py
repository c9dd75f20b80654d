"""End to end: SIPp (the PBX) places SIPREC calls with real speech into the real agent
(`callrec agent`, a pjsua2 worker process), which uploads to the real store
(`callrec store`). What is asserted is what a user checks: the catalog row, the
times, the masked number, the employee, the channels, and that the full number is
nowhere."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli.main import main as callrec
from agent.privacy import mask, normalise
from agent.recorder.sip import call_ref
from agent.store.catalog import Catalog, RecordingRow
from agent.store.keys.numbers import SealKeyring
from agent.testcall.sipp import SippResult, SiprecCall, free_port, run_sipp, siprec_scenario
from tests.support.audio import Speech, best_correlation, channel_rms, envelope, make_speech
from tests.support.daemons import Daemon, start_agent, start_store
from tests.support.logfmt import problems
from tests.support.stack import Keys, make_keys

pytestmark = [pytest.mark.sip]

CUSTOMER = "+358401234567"
# Every way the customer's number could be written down (E.164, national, digits,
# spaced, URL-encoded) — none may appear in anything the system wrote.
LEAK_FORMS = [
    CUSTOMER,
    CUSTOMER[1:],
    "0401234567",
    "040 123 4567",
    "401234567",
    urllib.parse.quote(CUSTOMER),
    "+358 40 123 4567",
]


@dataclass
class Stack:
    root: Path
    keys: Keys
    store: Daemon
    agent: Daemon
    sip_port: int
    speech: Speech

    @property
    def catalog(self) -> Catalog:
        return Catalog(f"sqlite:///{self.root / 'store-data' / 'catalog.sqlite3'}")

    def call(self, name: str, **fields: object) -> SippResult:
        fields.setdefault("service", "sip:01005577@pbx.example")
        call = SiprecCall(self.speech.customer, self.speech.employee, call_ms=4000, **fields)  # type: ignore[arg-type]
        result = run_sipp(
            siprec_scenario(call), ("127.0.0.1", self.sip_port), self.root / "pbx" / name
        )
        assert result.ok, result.errors + result.stdout[-2000:]
        return result

    def stored(self, result: SippResult, timeout: float = 60.0) -> RecordingRow:
        assert result.call_id is not None
        ref = call_ref(result.call_id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for row in self.catalog.list(limit=1000):
                if row.call_ref == ref:
                    return row
            time.sleep(0.2)
        raise AssertionError(f"call {ref} not stored:\n{self.agent.text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    keys = make_keys(root / "keys")
    speech = make_speech(root / "speech")
    store, address = start_store(root)
    sip_port = free_port()
    try:
        agent = start_agent(root, keys, address, sip_port)
    except BaseException:
        store.stop()
        raise
    try:
        yield Stack(root, keys, store, agent, sip_port, speech)
    finally:
        agent.stop()
        store.stop()


def _ms(epoch_s: float) -> int:
    return round(epoch_s * 1000)


def test_inbound_call_is_stored_masked_tagged_and_stereo(stack: Stack, tmp_path: Path) -> None:
    result = stack.call(
        "inbound", customer=f"sip:{CUSTOMER}@pbx.example", service="sip:01005577@pbx.example"
    )
    row = stack.stored(result)

    assert result.answered_at is not None and result.bye_at is not None
    assert abs(row.started_at_ms - _ms(result.answered_at)) <= 500
    assert abs(row.ended_at_ms - _ms(result.bye_at)) <= 500
    assert abs(row.duration_ms - 4000) <= 700
    assert row.customer_masked == "+358401234***"
    assert row.customer_tail_sealed and row.customer_digest is None
    assert row.employee_name == "Aino Virtanen" and row.employee_id == "e1001"
    assert row.service_number == "+3581005577"
    assert row.direction == "inbound"
    assert row.channels == 2 and row.audio_format == "opus"
    assert row.flags == ""

    # The exported audio is stereo: the customer's speech left, the employee's right.
    out = tmp_path / "call.ogg"
    store_dir = stack.root / "store-data"
    assert (
        callrec(
            [
                "console-export",
                row.recording_id,
                "--store-dir",
                str(store_dir),
                "--out",
                str(out),
                "--reason",
                "test",
                "--purpose",
                "verification",
            ]
        )
        == 0
    )
    left, right = channel_rms(out)
    assert left > 300 and right > 300, (left, right)
    sent_customer, sent_employee = envelope(stack.speech.customer), envelope(stack.speech.employee)
    rec_left, rec_right = envelope(out, 0), envelope(out, 1)
    assert best_correlation(rec_left, sent_customer) > 0.6
    assert best_correlation(rec_right, sent_employee) > 0.6
    assert best_correlation(rec_left, sent_customer) > best_correlation(rec_left, sent_employee)
    assert best_correlation(rec_right, sent_employee) > best_correlation(rec_right, sent_customer)

    text = stack.agent.text()
    assert f"event=call_answered call_ref={row.call_ref}" in text
    assert f"event=recording_uploaded recording_id={row.recording_id}" in text
    assert f"event=recording_stored recording_id={row.recording_id}" in stack.store.text()


def test_outbound_call_from_service_line(stack: Stack) -> None:
    result = stack.call(
        "outbound",
        customer="tel:040-123-4567",
        employee="sip:1002@pbx.example",
        employee_name="Mikko",
        service="sip:+3581005445@pbx.example",
        direction="outbound",
    )
    row = stack.stored(result)
    assert row.direction == "outbound"
    assert row.customer_masked == "+358401234***"
    assert row.employee_name == "Mikko Korhonen"
    assert row.service_number == "+3581005445"


def test_unknown_employee_is_recorded_and_flagged(stack: Stack) -> None:
    result = stack.call("unknown-employee", employee="sip:1099@pbx.example", employee_name=None)
    row = stack.stored(result)
    assert row.employee_id == "unknown" and row.employee_name == "unknown"
    assert "employee_unknown" in row.flags.split(",")
    assert row.customer_masked == "+358401234***"
    assert f"event=employee_unknown recording_id={row.recording_id}" in stack.agent.text()


def test_withheld_number_is_recorded_without_digest(stack: Stack) -> None:
    result = stack.call("withheld", customer="sip:anonymous@anonymous.invalid")
    row = stack.stored(result)
    assert row.customer_kind == "anonymous" and row.customer_masked == "anonymous"
    assert row.customer_tail_sealed is None
    assert "customer_withheld" in row.flags.split(",")


def test_malformed_metadata_still_records(stack: Stack) -> None:
    from agent.testcall.sipp import MALFORMED_METADATA

    result = stack.call("malformed", metadata=MALFORMED_METADATA)
    row = stack.stored(result)
    assert "metadata_invalid" in row.flags.split(",")
    assert row.employee_id == "unknown"
    assert row.duration_ms > 3000
    assert f"event=metadata_invalid recording_id={row.recording_id}" in stack.agent.text()


# (number as the PBX sends it, E.164) — one call each, every format the issue lists.
FORMATS = [
    ("tel:+358-50-765-4321", "+358507654321"),
    ("sips:0457778889@sbc.example", "+358457778889"),
    ('"Matti Meikäläinen" <sip:00358409998887@sbc.example;user=phone>', "+358409998887"),
    ("sip:%2B358442223334@pbx.example", "+358442223334"),
    ("sip:+46 8 123 456 78@pbx.example".replace(" ", ""), "+46812345678"),
]


def _forms(e164: str) -> list[str]:
    """How a number could be written down: E.164, digits, URL-encoded, national
    (Finnish numbers), spaced, and the subscriber part alone."""
    forms = [e164, e164[1:], urllib.parse.quote(e164), "00" + e164[1:], e164[-9:]]
    if e164.startswith("+358"):
        national = "0" + e164[4:]
        forms += [national, f"{national[:3]} {national[3:6]} {national[6:]}"]
    return forms


def test_many_number_formats_mask_and_seal_alike(stack: Stack) -> None:
    keyring = SealKeyring.load(stack.keys.seal_private)
    for n, (sent, e164) in enumerate(FORMATS):
        row = stack.stored(stack.call(f"format-{n}", customer=sent))
        assert row.customer_masked == e164[:-3] + "***", sent
        # A data-subject request gives the number in any format: the masked form and
        # the sealed tail (opened by the store) match it.
        assert row.customer_tail_sealed and keyring.open(row.customer_tail_sealed) == e164[-3:]
        givens = [f for f in _forms(e164) if f.startswith(("+", "00", "0"))]
        for given in givens:
            normalised = normalise(given, "FI").e164
            assert normalised == e164 and mask(normalised) == row.customer_masked


def test_directory_edit_applies_to_the_next_call(stack: Stack) -> None:
    people = stack.root / "people.toml"
    original = people.read_text()
    try:
        # Config management replaces the file: write beside it, rename over it.
        staged = stack.root / ".people.toml.new"
        staged.write_text(original.replace("Aino Virtanen", "Aino Laine"))
        staged.replace(people)
        stack.agent.wait_for(r"event=directory_reloaded", timeout=10)
        row = stack.stored(stack.call("renamed"))
        assert row.employee_name == "Aino Laine" and row.employee_id == "e1001"

        mark = len(stack.agent.text())
        people.write_text(original.replace('role = "agent"', 'role = "boss"', 1))
        failed = stack.agent.wait_for(r"event=directory_reload_failed reason=[^\n]*", 10, mark)
        assert "role = 'boss'" in failed.group(0)
        row = stack.stored(stack.call("after-broken-edit"))
        assert row.employee_name == "Aino Laine", "a broken edit keeps the previous directory"
    finally:
        mark = len(stack.agent.text())
        people.write_text(original)
        stack.agent.wait_for(r"event=directory_reloaded", timeout=10, after=mark)


def test_full_number_is_nowhere(stack: Stack) -> None:
    """Runs last in this module: every byte the agent and the store wrote (data
    directories, SQLite, blobs, both daemons' logs incl. pjsip's) is searched."""
    scanned = 0
    for base in (stack.root / "agent-data", stack.root / "store-data", stack.root / "logs"):
        for path in base.rglob("*"):
            if path.is_file() and not path.is_socket():
                data = path.read_bytes()
                scanned += 1
                for form in LEAK_FORMS + [f for _, e164 in FORMATS for f in _forms(e164)]:
                    assert form.encode() not in data, f"{form!r} found in {path}"
    assert scanned >= 5
    assert "+358401234***" in stack.agent.text()


def test_every_log_line_is_logfmt_in_one_quoting_style(stack: Stack) -> None:
    """Issue 17: what Loki's ``| logfmt`` reads. Every line both daemons wrote in this
    module's calls (workers', pjsip's, the uplink's, the store's) is ``<time> <logger>
    [level=…] event=<name> key=value …`` with double quotes only."""
    for daemon in (stack.agent, stack.store):
        lines = daemon.text().splitlines()
        assert len(lines) > 10, daemon.name
        bad = [(why, line) for line in lines if (why := problems(line)) is not None]
        assert bad == [], f"{daemon.name}: {bad[:5]}"
    assert 'employee="Aino Virtanen"' in stack.agent.text()
