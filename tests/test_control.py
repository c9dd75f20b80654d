"""Recording control for real: the agent (its Kamailio front, a pjsua2 worker), SIPp as
the SRC, the store; pause/resume/discard through the agent's control API (HTTP with a
token) and through the SRC's own a=inactive, checked in what the store holds (audio
decoded, the catalog's pauses, the data-subject package's metadata) and on disk."""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import shlex
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.cli.main import main as callrec
from agent.config import load_agent_config
from agent.recorder.control.tokens import new_token
from agent.recorder.front.files import front_files
from agent.store.access.queries import package_metadata
from agent.store.audit import chain as audit
from agent.store.ingest import discards
from agent.testcall.sipp import Midcall, SippResult, SiprecCall, free_port, siprec_scenario
from tests.support.audio import decode, long_speech
from tests.support.daemons import REPO, start_agent, start_store
from tests.support.pool import Pool, epoch, flags, rtp_sender, stop_pool, window_rms
from tests.support.stack import make_keys
from tests.test_spool import wav

pytestmark = [pytest.mark.sip, pytest.mark.slow]

FLOOR_RMS = 30  # what the bridge's silence decodes to (the pool tests' measure)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pool, str]]:
    """One worker behind the agent's own front, the control API on a free port with one
    token (integration "crm"); yields the pool and the token."""
    root = tmp_path_factory.mktemp("control")
    with running_control(root) as running:
        yield running


@contextmanager
def running_control(
    root: Path, audio: dict[str, object] | None = None, uplink: dict[str, object] | None = None
) -> Iterator[tuple[Pool, str]]:
    """Store, RTP sender and the agent with one worker and the control API; yields the
    pool and a token of integration "crm". ``audio``, ``uplink``: the agent's
    ``[audio]``, ``[uplink]`` keys."""
    keys, speech = make_keys(root / "keys"), long_speech(root / "speech", 32)
    (root / "store").mkdir()
    (root / "agent").mkdir()
    token = new_token("crm", root / "agent" / "control.tokens")
    store, address = start_store(root / "store")
    try:
        with rtp_sender(root, "python") as (rtp, sender):
            sip_port, control_port = free_port(), free_port()
            sip = {
                "front": True, "run_front": True, "workers": 1, "worker_port": free_port(1),
                "front_http_port": free_port(), "rtp_port_count": 40,
                "rtp_port_start": free_port(40), "probe_interval": "1s", "rtp_timeout": "3s",
            }  # fmt: skip
            control: dict[str, object] = {
                "listen": f"127.0.0.1:{control_port}",
                "tokens_file": str(root / "agent" / "control.tokens"),
            }
            agent = start_agent(
                root / "agent", keys, address, sip_port, sip=sip, control=control,
                audio=audio or {}, uplink=uplink or {},
            )  # fmt: skip
            cfg = load_agent_config(root / "agent" / "agent.toml")
            pool = Pool(
                root / "agent", agent, keys, address, root / "store" / "store-data", sip_port,
                1, front_files(cfg), speech, rtp, sender,
            )  # fmt: skip
            try:
                yield pool, token
            finally:
                stop_pool(pool)
    finally:
        store.stop()


class Api:
    def __init__(self, pool: Pool, token: str | None) -> None:
        cfg = load_agent_config(pool.root / "agent.toml")
        assert cfg.control is not None
        self.port = int(cfg.control.listen.rpartition(":")[2])
        self.token = token

    def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        data = body if isinstance(body, bytes) else None
        if body is not None and data is None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def live(self, extension: str, timeout: float = 15.0) -> dict[str, Any]:
        """The live call of ``extension`` once it is answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, doc = self.request("GET", f"/calls?extension={extension}")
            calls = [c for c in doc.get("calls", []) if c["state"] != "ended"]
            if status == 200 and calls:
                found: dict[str, Any] = calls[0]
                return found
            time.sleep(0.1)
        raise AssertionError(f"no live call for {extension}")


def _at(started_at: str, offset_s: float) -> None:
    """Sleep until ``offset_s`` after the call's answer (the agent's clock = ours)."""
    time.sleep(max(0.0, epoch(started_at) + offset_s - time.time()))


def _place(pool: Pool, executor: ThreadPoolExecutor, call: SiprecCall) -> Future[SippResult]:
    return executor.submit(pool.run, siprec_scenario(call), "control", timeout_s=60)


def _silence_span(audio: tuple[int, Sequence[int]]) -> tuple[float, float, float]:
    """For a failure's message: the audio's length and the first and last 20 ms window
    of channel 0 at the floor between 5 and 25 s."""
    silent = [
        t / 50 for t in range(250, 1250) if window_rms(audio, 0, t / 50, t / 50 + 0.02) < FLOOR_RMS
    ]
    length = len(audio[1]) / audio[0] / 8000
    return (round(length, 3), silent[0] if silent else -1.0, silent[-1] if silent else -1.0)


def _pause_offsets(row_pauses: list[dict[str, Any]], started_ms: int) -> list[tuple[float, float]]:
    return [
        (epoch(p["start"]) - started_ms / 1000, epoch(p["end"]) - started_ms / 1000)
        for p in row_pauses
    ]


@pytest.mark.alone
def test_a_pause_through_the_api_is_silence_of_the_right_length_and_is_stored(
    pool: tuple[Pool, str], tmp_path: Path
) -> None:
    """A 30 s call paused from 10 s to 20 s by extension: stored 30 s long, silence
    (RMS at the floor) from 10 to 20 s within 100 ms, speech around it, the interval
    with who asked in the catalog and in the data-subject package."""
    running, token = pool
    api = Api(running, token)
    with ThreadPoolExecutor(1) as executor:
        future = _place(running, executor, running.call(call_ms=30_000))
        call = api.live("1001")
        _at(call["started_at"], 10.0)
        asked = [time.time() - epoch(call["started_at"])]  # when the requests really left
        status, paused = api.request("POST", "/calls/pause", {"extension": "1001"})
        assert status == 200 and paused["call"]["state"] == "paused", paused
        again = api.request("POST", f"/calls/{call['recording_id']}/pause")
        assert again[0] == 200 and len(again[1]["call"]["pauses"]) == 1  # idempotent
        _at(call["started_at"], 20.0)
        asked.append(time.time() - epoch(call["started_at"]))
        status, resumed = api.request("POST", "/calls/resume", {"extension": "1001"})
        assert status == 200 and resumed["call"]["state"] == "recording", resumed
        result = future.result()
    assert result.ok, result.errors[-1500:]
    row = running.stored(result.call_id)
    assert abs(row.duration_ms - 30_000) <= 500 and "paused" in flags(row)
    [(start, end)] = _pause_offsets(row.pauses, row.started_at_ms)
    # The pause starts within 100 ms of the request. It ends when the streams are
    # connected again: a resume first waits out what the jitter buffer holds (said
    # during the pause; 103 ms once in CI), so its end gets that much more.
    assert 0 <= start - asked[0] <= 0.1 and 0 <= end - asked[1] <= 0.2, (start, end, asked)
    assert abs(start - 10.0) <= 0.2 and abs(end - 20.0) <= 0.2, (start, end)
    assert row.pauses[0]["who"] == "api:crm"
    audio = decode(running.export(row, tmp_path / "paused.ogg"))
    where = _silence_span(audio)
    for channel in (0, 1):
        assert window_rms(audio, channel, 1.0, 9.5) > 500, (channel, where)
        assert window_rms(audio, channel, start + 0.1, end - 0.1) < FLOOR_RMS, (channel, where)
        assert window_rms(audio, channel, 20.5, 29.0) > 500, (channel, where)
    package = json.loads(package_metadata([row], 0))["recordings"][0]
    assert package["pauses"] == row.pauses
    with running.catalog.engine.connect() as conn:
        [audited] = [e for e in audit.events_for(conn, row.recording_id) if e.action == "pause"]
    assert audited.detail.endswith(" s by api:crm") and audited.actor == "agent:hel-1"
    assert "event=control_request integration=crm op=pause" in running.text()


@pytest.mark.alone
def test_the_srcs_inactive_reinvite_is_a_pause_marked_src(
    pool: tuple[Pool, str], tmp_path: Path
) -> None:
    running, _ = pool
    call = running.call(
        call_ms=12_000, midcall=(Midcall(4000, sdp_direction="inactive"), Midcall(8000))
    )
    with ThreadPoolExecutor(1) as executor:
        result = _place(running, executor, call).result()
    assert result.ok, result.errors[-1500:]
    row = running.stored(result.call_id)
    [(start, end)] = _pause_offsets(row.pauses, row.started_at_ms)
    assert abs(start - 4.0) <= 0.3 and abs(end - 8.0) <= 0.3, (start, end)
    assert row.pauses[0]["who"] == "src" and "paused" in flags(row)
    audio = decode(running.export(row, tmp_path / "hold.ogg"))
    for channel in (0, 1):
        assert window_rms(audio, channel, start + 0.1, end - 0.1) < FLOOR_RMS, channel


def test_refused_requests_change_nothing_and_an_ended_call_is_409(pool: tuple[Pool, str]) -> None:
    running, token = pool
    api, anonymous, wrong = Api(running, token), Api(running, None), Api(running, "x" * 40)
    with ThreadPoolExecutor(1) as executor:
        future = _place(running, executor, running.call(call_ms=6000))
        call = api.live("1001")
        rid = call["recording_id"]
        assert anonymous.request("POST", f"/calls/{rid}/pause")[0] == 401
        status, openapi = anonymous.request("GET", "/openapi.json")  # public: the contract
        assert status == 200 and "/calls/{recording_id}/pause" in openapi["paths"]
        assert wrong.request("POST", "/calls/pause", {"extension": "1001"})[0] == 401
        assert wrong.request("GET", f"/calls/{rid}")[0] == 401
        refusals = [
            api.request("POST", "/calls/pause", b"{not json"),
            api.request("POST", "/calls/pause", {"extension": "1001", "call_id": "x"}),
            api.request("POST", "/calls/pause", {"extension": 1001}),
            api.request("POST", "/calls/pause", b"[]"),
            api.request("POST", "/calls/pause", {"extension": "1" * 5000}),
            api.request("POST", "/calls/pause", b"{}", {"Content-Type": "text/plain"}),
            api.request("POST", "/calls/XYZ/pause"),
            api.request("POST", f"/calls/{rid}/explode"),
            api.request("POST", f"/calls/{rid}/employee", {"employee": {"nobody": "x"}}),
        ]
        assert [s for s, _ in refusals] == [400, 400, 400, 400, 413, 415, 400, 404, 400]
        status, doc = api.request("GET", f"/calls/{rid}")
        assert status == 200 and doc["calls"][0]["state"] == "recording"
        assert doc["calls"][0]["pauses"] == []
        result = future.result()
    assert result.ok
    row = running.stored(result.call_id)
    assert row.pauses == [] and "paused" not in flags(row)
    for path in (f"/calls/{rid}/pause", f"/calls/{rid}/resume", f"/calls/{rid}/discard"):
        status, doc = api.request("POST", path)
        assert (status, doc["error"]) == (409, "the call has ended"), path
    status, doc = api.request("POST", "/calls/pause", {"call_id": result.call_id})
    assert (status, doc["error"]) == (409, "the call has ended")
    assert api.request("POST", "/calls/pause", {"extension": "1001"})[0] == 404
    log = running.text()
    assert "event=control_refused integration=- peer=127.0.0.1 status=401" in log
    assert "x" * 40 not in log and token not in log


def test_discard_leaves_no_audio_anywhere_and_one_audited_entry(pool: tuple[Pool, str]) -> None:
    running, token = pool
    api = Api(running, token)
    with ThreadPoolExecutor(1) as executor:
        future = _place(running, executor, running.call(call_ms=20_000))
        call = api.live("1001")
        rid = call["recording_id"]
        _at(call["started_at"], 15.0)
        status, doc = api.request("POST", "/calls/discard", {"extension": "1001"})
        assert status == 200 and doc["call"]["state"] == "discarded", doc
        assert api.request("POST", f"/calls/{rid}/discard")[0] == 200  # idempotent
        assert api.request("POST", f"/calls/{rid}/resume")[0] == 409
        on_disk = [p for p in running.root.rglob("*") if p.suffix in (".wav", ".ogg")]
        assert on_disk == [], on_disk  # the legs went at once, during the call
        result = future.result()
    assert result.ok, result.errors[-1500:]
    catalog = running.catalog
    deadline = time.monotonic() + 30
    while discards.get(catalog, rid) is None and time.monotonic() < deadline:
        time.sleep(0.3)
    kept = discards.get(catalog, rid)
    assert kept is not None and "discarded" in kept.flags.split(",")
    assert catalog.get(rid) is None
    with catalog.engine.connect() as conn:
        events = [(e.action, e.outcome) for e in audit.events_for(conn, rid)]
    assert events == [("discard", "discarded")]
    left = [path for root in (running.root, running.store_dir) for path in root.rglob(f"*{rid}*")]
    assert left == [], left  # agent captures and outbox, store blobs and incoming parts
    with catalog.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(discards.discarded_recordings))
        assert count.scalar() == 1


def _readme_lines(port: int) -> list[str]:
    """The ``callrec control`` and ``curl`` lines of the README's control section,
    pointed at this test's agent."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Recording control", 1)[1].split("\n## ", 1)[0]
    lines = [
        line.strip()
        for line in section.splitlines()
        if line.startswith(("callrec control ", "curl -sS"))
    ]
    return [line.replace("127.0.0.1:8470", f"127.0.0.1:{port}") for line in lines]


def test_the_readme_integration_lines_and_a_late_employee_binding_work(
    pool: tuple[Pool, str], tmp_path: Path
) -> None:
    """The README's client lines run against a live call (pause, status, resume by
    extension); a call whose metadata names nobody known gets its employee from the
    ACD while it runs, and is stored with them."""
    running, token = pool
    api = Api(running, token)
    token_file = tmp_path / "control.token"
    token_file.write_text(token + "\n")
    lines = _readme_lines(api.port)
    assert len(lines) == 5, lines
    nobody = running.call(call_ms=12_000, employee="sip:9999@pbx.example", employee_name=None)
    with ThreadPoolExecutor(2) as executor:
        known = _place(running, executor, running.call(call_ms=12_000))
        unknown = _place(running, executor, nobody)
        api.live("1001")
        states = []
        for line in lines:
            args = shlex.split(line.replace("/etc/callrec/control.token", str(token_file)))
            if args[0] == "callrec":
                assert callrec(args[1:]) == 0, line
            else:  # as a shell runs it, $CALLREC_CONTROL_TOKEN and all
                env = {**os.environ, "CALLREC_CONTROL_TOKEN": token}
                done = subprocess.run(
                    ["sh", "-c", line], env=env, capture_output=True, timeout=10, check=True
                )
                assert json.loads(done.stdout)["call"]["recording_id"], (line, done.stdout)
            states.append(api.live("1001")["state"])
        assert states == ["paused", "paused", "recording", "paused", "recording"]
        [stray] = api.request("GET", "/calls?person=unknown")[1]["calls"]
        binding = {"employee": {"extension": "1002"}}
        status, doc = api.request("POST", f"/calls/{stray['recording_id']}/employee", binding)
        assert status == 200 and [e["id"] for e in doc["call"]["employees"]] == ["e1002"], doc
        results = [known.result(), unknown.result()]
    assert all(r.ok for r in results), [r.errors[-800:] for r in results]
    row = running.stored(results[1].call_id)
    assert [e["id"] for e in row.employees] == ["e1002"] and "employee_unknown" not in flags(row)
    assert "event=employee_bound" in running.text()
    # Two pauses, or one when the second came before the resume took effect (a resume
    # waits out the jitter buffer): never overlapping, and the recording is stored.
    pauses = running.stored(results[0].call_id).pauses
    assert 1 <= len(pauses) <= 2 and all(p["end"] for p in pauses), pauses
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(pauses)), pauses


@pytest.mark.alone
def test_what_was_said_during_a_pause_is_not_written_after_it(
    pool: tuple[Pool, str], tmp_path: Path
) -> None:
    """The customer is silent but for a tone in the last 1.5 s of a pause: nothing of
    it reaches the recording after the resume (without the null sink the stream kept
    0.42 s of it back and wrote it on resume; the resume waits out what the jitter buffer
    still holds). The window starts 100 ms after the stored end, the issue's margin."""
    running, token = pool
    api = Api(running, token)
    rate = 8000
    burst = [0] * (rate * 8 + rate // 2) + [6000 if (i // 4) % 2 else -6000 for i in range(
        int(rate * 1.45))] + [0] * (rate * 5)  # fmt: skip
    customer = tmp_path / "burst.wav"
    customer.write_bytes(wav(struct.pack(f"<{len(burst)}h", *burst)))
    quiet = tmp_path / "quiet.wav"
    quiet.write_bytes(wav(bytes(2 * len(burst))))
    call = dataclasses.replace(
        running.call(call_ms=14_000), customer_wav=customer, employee_wav=quiet
    )
    with ThreadPoolExecutor(1) as executor:
        future = _place(running, executor, call)
        live = api.live("1001")
        _at(live["started_at"], 5.0)
        assert api.request("POST", "/calls/pause", {"extension": "1001"})[0] == 200
        _at(live["started_at"], 10.0)
        assert api.request("POST", "/calls/resume", {"extension": "1001"})[0] == 200
        result = future.result()
    assert result.ok, result.errors[-1500:]
    row = running.stored(result.call_id)
    [(start, end)] = _pause_offsets(row.pauses, row.started_at_ms)
    audio = decode(running.export(row, tmp_path / "burst.ogg"))
    assert window_rms(audio, 0, end + 0.1, end + 2.0) < FLOOR_RMS, _silence_span(audio)
    assert window_rms(audio, 0, start + 0.1, end - 0.1) < FLOOR_RMS
