"""The pieces of recording control without SIP: the [control] config, tokens hashed at
rest, what commands do to a capture's metadata, the pauses a manifest may carry, the
PBX's pauses in a spool sidecar (silence written in the legs), and the store's Discard
against the real store over mutual TLS (partial upload removed, stored recording
marked for erasure, one audited trace, idempotent, another site refused)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import struct
import wave
from pathlib import Path

import grpc
import pytest

from agent.capture import (
    UNKNOWN,
    CaptureMeta,
    Direction,
    Employee,
    Flag,
    Pause,
    iso_ms,
    utc_now,
)
from agent.config import ConfigError
from agent.manifest import (
    ManifestError,
    discard_manifest_from_capture,
    manifest_from_capture,
    validate_discard_manifest,
    validate_manifest,
)
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.privacy import NumberKind, ProtectedNumber
from agent.recorder.control import calls as call_control
from agent.recorder.control.tokens import Tokens, digest, new_token
from agent.recorder.spool.files import SpoolError, parse_sidecar
from agent.recorder.spool.pauses import silence
from agent.store.archive.vault import open_storage
from agent.store.audit import chain as audit
from agent.store.ingest import discards
from tests.support.faults import ingest_stub
from tests.support.pki import Pki, make_pki
from tests.support.stack import Keys, agent_config
from tests.test_ingest_limits import OTHER_SITE, limited_store, upload

T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A CA, the store's pair and agent pairs for hel-1 and OTHER_SITE."""
    made = make_pki(tmp_path / "pki")
    made.add_agent(OTHER_SITE)
    return made


def _meta(**changes: object) -> CaptureMeta:
    meta = CaptureMeta(
        recording_id="a" * 32, site="hel-1", source="siprec", call_ref="c" * 16,
        direction=Direction.INBOUND, started_at=iso_ms(T0),
        ended_at=iso_ms(T0 + dt.timedelta(seconds=30)), service_number=None,
        customer=ProtectedNumber(NumberKind.ANONYMOUS, "anonymous"),
        employees=(Employee(UNKNOWN, UNKNOWN, "", iso_ms(T0)),), legs=("customer.wav",),
        flags=(Flag.EMPLOYEE_UNKNOWN,),
    )  # fmt: skip
    return dataclasses.replace(meta, **changes)  # type: ignore[arg-type]


def _at(seconds: float) -> str:
    return iso_ms(T0 + dt.timedelta(seconds=seconds))


# ---------------------------------------------------------------- config and tokens


def test_control_config_needs_a_way_to_authenticate_and_tls_off_loopback(
    tmp_path: Path, keys: Keys
) -> None:
    with pytest.raises(ConfigError, match=r"\[control\] tokens_file: missing"):
        agent_config(tmp_path, keys, "127.0.0.1:1", control={"listen": "127.0.0.1:8470"})
    tokens = str(tmp_path / "t")
    with pytest.raises(ConfigError, match=r'\[control\] listen = "10.0.0.5:8470": expected a lo'):
        agent_config(tmp_path, keys, "127.0.0.1:1", control={"listen": "10.0.0.5:8470",
                                                             "tokens_file": tokens})  # fmt: skip
    with pytest.raises(ConfigError, match=r"\[control\] key_file: missing"):
        agent_config(
            tmp_path, keys, "127.0.0.1:1", control={"tokens_file": tokens, "ca_file": tokens,
                                                    "cert_file": tokens},
        )  # fmt: skip
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", control={"tokens_file": tokens})
    assert cfg.control is not None and cfg.control.listen == "127.0.0.1:8470"


def test_tokens_are_kept_as_hashes_and_a_broken_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "control.tokens"
    token = new_token("crm", path)
    text = path.read_text()
    assert token not in text and text == f"crm {digest(token)}\n"
    tokens = Tokens.load(path)
    assert tokens.integration(token) == "crm"
    assert tokens.integration(token + "x") is None and tokens.integration("") is None
    path.write_text(text + "ivr not-a-hash\n")
    with pytest.raises(ConfigError, match="line 2: expected '<integration> <sha256 hex>'"):
        Tokens.load(path)


def test_callrec_check_names_a_broken_tokens_file(
    tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli.main import main as callrec
    from tests.support.stack import write_toml

    tokens = tmp_path / "control.tokens"
    tokens.write_text("crm 1234\n")
    _, doc = agent_config(tmp_path, keys, "127.0.0.1:1", control={"tokens_file": str(tokens)})
    assert callrec(["check", "--agent", str(write_toml(tmp_path / "agent.toml", doc))]) == 1
    assert f"[control] tokens_file = '{tokens}' line 1" in capsys.readouterr().err


# ---------------------------------------------------------------- commands on metadata


def test_pauses_open_and_close_once_and_the_src_closes_only_its_own() -> None:
    meta = call_control.open_pause(_meta(), "api:crm", _at(10))
    assert call_control.open_pause(meta, "src", _at(11)) == meta  # one open at a time
    assert meta.paused and Flag.PAUSED in meta.flags
    assert call_control.close_pause(meta, _at(12), only_who="src") == meta
    closed = call_control.close_pause(meta, _at(20))
    assert closed.pauses == (Pause(_at(10), _at(20), "api:crm"),) and not closed.paused
    never_resumed = call_control.open_pause(closed, "src", _at(25)).with_pauses_closed(_at(30))
    assert never_resumed.pauses[-1] == Pause(_at(25), _at(30), "src")


def test_a_pause_asked_before_the_last_resume_took_effect_goes_on() -> None:
    """Pause, resume (its end 60 ms ahead: the jitter buffer), pause again 20 ms later,
    as the README's lines did in CI: one pause, not two overlapping ones (the store
    refused that manifest and the recording went to quarantine)."""
    meta = call_control.open_pause(_meta(), "api:crm", _at(10))
    resumed = call_control.close_pause(meta, _at(10.06))
    again = call_control.open_pause(resumed, "api:crm", _at(10.02))
    assert again.paused and again.pauses == (Pause(_at(10), None, "api:crm"),)
    later = call_control.open_pause(resumed, "api:crm", _at(10.5))
    assert later.pauses == (
        Pause(_at(10), _at(10.06), "api:crm"),
        Pause(_at(10.5), None, "api:crm"),
    )


def test_a_late_employee_replaces_nobody_and_a_discard_leaves_no_legs() -> None:
    aino = Employee("e1001", "Aino Virtanen", "1001", _at(12), "sales")
    bound = call_control.bind_employee(_meta(), aino)
    assert bound.employees == (dataclasses.replace(aino, joined_at=_at(0)),)
    assert Flag.EMPLOYEE_UNKNOWN not in bound.flags
    assert call_control.bind_employee(bound, aino) == bound
    gone = call_control.discarded(call_control.open_pause(bound, "api:crm", _at(5)), _at(15))
    assert gone.legs == () and Flag.DISCARDED in gone.flags and not gone.paused
    assert not call_control.valid_who("api:crm; drop table") and call_control.valid_who("src")


# ---------------------------------------------------------------- the manifest's pauses


def test_a_manifest_carries_its_pauses_and_refuses_ones_outside_the_call() -> None:
    meta = _meta(pauses=(Pause(_at(10), _at(20), "api:crm"), Pause(_at(25), None, "src")))
    manifest = manifest_from_capture(meta, "opus", 2, 100, "0" * 64, "fi")
    validate_manifest(manifest, now=T0 + dt.timedelta(minutes=1))
    assert manifest.pauses[1].end == manifest.ended_at  # left open: ends with the call
    bad = {
        "outside": (Pause(_at(10), _at(31), "api:crm"),),
        "unordered": (Pause(_at(10), _at(20), "src"), Pause(_at(15), _at(18), "src")),
        "who": (Pause(_at(10), _at(20), "api:crm\n"),),
    }
    for pauses in bad.values():
        wrong = manifest_from_capture(_meta(pauses=pauses), "opus", 2, 100, "0" * 64, "fi")
        with pytest.raises(ManifestError, match="pauses"):
            validate_manifest(wrong, now=T0 + dt.timedelta(minutes=1))


def test_show_lists_the_pauses_from_the_calls_start() -> None:
    from agent.cli.access import format_pauses

    meta = _meta(pauses=(Pause(_at(10), _at(20.25), "api:crm"), Pause(_at(25), None, "src")))
    manifest = manifest_from_capture(meta, "opus", 2, 100, "0" * 64, "fi")
    assert format_pauses(manifest) == [
        "  paused 10.0-20.2 s (api:crm)",
        "  paused 25.0-30.0 s (src)",
    ]


def test_a_discard_manifest_has_no_audio_and_says_discarded() -> None:
    meta = call_control.discarded(_meta(), _at(15))
    manifest = discard_manifest_from_capture(meta, "fi")
    validate_discard_manifest(manifest, now=T0 + dt.timedelta(minutes=1))
    manifest.size = 10
    with pytest.raises(ManifestError, match="no audio"):
        validate_discard_manifest(manifest, now=T0 + dt.timedelta(minutes=1))


# ---------------------------------------------------------------- the PBX's pauses


def _sidecar(pauses: object) -> str:
    return json.dumps(
        {"call_id": "1.2", "started_at": "2026-03-02T09:00:00Z", "ended_at": 1772442030,
         "audio": {"mixed": "x.wav"}, "pauses": pauses}
    )  # fmt: skip


def test_sidecar_pauses_are_parsed_and_silenced_in_the_legs(tmp_path: Path) -> None:
    car = parse_sidecar(_sidecar([{"start": "2026-03-02T09:00:01Z", "end": 1772442002.5}]))
    assert car.pauses == ((T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(seconds=2.5)),)
    leg = tmp_path / "mixed.wav"
    with wave.open(str(leg), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(struct.pack("<h", 1000) * 8000 * 4)
    silence(leg, T0, car.pauses)
    with wave.open(str(leg), "rb") as r:
        samples = struct.unpack(f"<{4 * 8000}h", r.readframes(4 * 8000))
    assert set(samples[:8000]) == {1000} and set(samples[20000:]) == {1000}
    assert set(samples[8000:20000]) == {0}
    for wrong in ([{"start": 1772442010, "end": 1772442040}], [{"start": 1}], "x"):
        with pytest.raises(SpoolError, match="pauses"):
            parse_sidecar(_sidecar(wrong))


# ---------------------------------------------------------------- the store's Discard


def _discard_manifest(site: str, rid: str | None = None) -> pb.Manifest:
    now = utc_now()
    meta = _meta(
        recording_id=rid or os.urandom(16).hex(), site=site,
        started_at=iso_ms(now - dt.timedelta(seconds=20)), ended_at=iso_ms(now),
    )  # fmt: skip
    return discard_manifest_from_capture(call_control.discarded(meta, iso_ms(now)), "fi")


def test_discard_at_the_store_removes_what_it_holds_and_keeps_one_audited_trace(
    tmp_path: Path, pki: Pki
) -> None:
    with limited_store(tmp_path, pki, upload_idle_timeout="1s") as store:
        hel = ingest_stub(store, pki)
        stored = upload(hel, os.urandom(5000), "hel-1")  # e.g. a live upload finished
        partial = _discard_manifest("hel-1")
        incoming = store.config.incoming_dir
        (incoming / f"{partial.recording_id}.part").write_bytes(b"x" * 100)
        (incoming / f"{partial.recording_id}.manifest").write_bytes(b"{}")
        for manifest in (partial, _discard_manifest("hel-1", stored.recording_id)):
            receipt = hel.Discard(pb.DiscardRequest(manifest=manifest), timeout=10)
            again = hel.Discard(pb.DiscardRequest(manifest=manifest), timeout=10)
            assert receipt == again and receipt.size == 0 and receipt.sha256 == ""
        assert list(incoming.glob(f"{partial.recording_id}*")) == []
        with pytest.raises(grpc.RpcError) as err:
            other = ingest_stub(store, pki, f"agent-{OTHER_SITE}")
            other.Discard(pb.DiscardRequest(manifest=_discard_manifest("hel-1")), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with_audio = _discard_manifest("hel-1")
        with_audio.size = 5
        with pytest.raises(grpc.RpcError) as err:
            hel.Discard(pb.DiscardRequest(manifest=with_audio), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        storage = open_storage(store.config)
        try:
            catalog = storage.catalog
            row = catalog.get(stored.recording_id)
            assert row is not None and row.destroy_reason == "erasure"
            for rid in (partial.recording_id, stored.recording_id):
                kept = discards.get(catalog, rid)
                assert kept is not None and kept.customer_masked == "anonymous"
                with catalog.engine.connect() as conn:
                    events = [(e.action, e.actor) for e in audit.events_for(conn, rid)]
                assert events[-1] == ("discard", "agent:hel-1")
                assert [a for a, _ in events].count("discard") == 1
            assert discards.get(catalog, with_audio.recording_id) is None
        finally:
            storage.catalog.close()


# ---------------------------------------------------------------- the web player


def test_the_recording_page_lists_the_pauses_and_marks_them_on_the_waveform() -> None:
    from zoneinfo import ZoneInfo

    from agent.pb.callrec.v1 import access_pb2 as apb
    from agent.web.i18n import translator
    from agent.web.pages import details
    from agent.web.render import TEMPLATES

    meta = _meta(pauses=(Pause(_at(10), _at(20), "api:crm"),), flags=(Flag.PAUSED,))
    manifest = manifest_from_capture(meta, "opus", 2, 100, "0" * 64, "fi")
    view = apb.RecordingView(info=pb.RecordingInfo(manifest=manifest, duration_ms=30_000))
    rec = details(view, ZoneInfo("Europe/Helsinki"), "en")
    assert rec["pauses"] == [{"label": "0:10-0:20", "who": "api:crm", "start_s": 10.0,
                              "end_s": 20.0, "x": 333.3, "w": 333.3}]  # fmt: skip
    assert rec["marks"] == [{"start_s": 10.0, "end_s": 20.0, "label": "0:10-0:20 (api:crm)"}]
    html = TEMPLATES.get_template("recording.html").render(
        t=translator("en"), lang="en", person=None, csrf="", rec=rec, purpose="legal",
        purposes=["legal"],
    )  # fmt: skip
    assert '<span class="tag pause">0:10-0:20 (api:crm)</span>' in html
    assert "data-marks=" in html and "0:10-0:20 (api:crm)" in html.split("data-marks=")[1]
    assert "recording paused" in html  # the flag in words


# ---------------------------------------------------------------- late binding in the outbox


def test_an_employee_is_bound_in_the_outbox_under_its_lock_and_refused_after_upload(
    tmp_path: Path, keys: Keys
) -> None:
    from google.protobuf import json_format

    from agent.directory import LiveDirectory
    from agent.recorder.control.desk import ControlDesk
    from agent.recorder.finalize import MANIFEST_FILE
    from agent.recorder.uplink.outbox import Outbox

    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", control={"tokens_file": "t"})
    outbox = Outbox(cfg.outbox_dir)
    desk = ControlDesk(cfg, LiveDirectory(cfg.directory_file), outbox)
    now = utc_now()
    meta = _meta(started_at=iso_ms(now - dt.timedelta(seconds=30)), ended_at=iso_ms(now))
    manifest = manifest_from_capture(meta, "opus", 2, 100, "0" * 64, "fi")
    (cfg.outbox_dir / meta.recording_id).mkdir()
    (cfg.outbox_dir / meta.recording_id / MANIFEST_FILE).write_text(
        json_format.MessageToJson(manifest)
    )
    body = {"employee": {"extension": "1002"}}
    with outbox.locked(meta.recording_id, 0) as held:  # an upload attempt in progress
        assert held
        busy = desk.command("employee", "recording_id", meta.recording_id, "api:acd", body)
    assert busy.status == 409 and busy.doc["retry_after_s"] == 2
    done = desk.command("employee", "recording_id", meta.recording_id, "api:acd", body)
    assert done.status == 200, done.doc
    stored = outbox.open(meta.recording_id).manifest
    assert [(e.id, e.name) for e in stored.employees] == [("e1002", "Mikko Korhonen")]
    assert stored.employees[0].joined_at == stored.started_at
    assert "employee_unknown" not in stored.flags
    validate_manifest(stored)
    receipt = pb.UploadReceipt(recording_id=meta.recording_id, sha256=stored.sha256)
    outbox.remove(outbox.open(meta.recording_id), receipt)
    after = desk.command("employee", "recording_id", meta.recording_id, "api:acd", body)
    assert after.status == 409 and "rectif" in after.doc["error"]
    paused = desk.command("pause", "recording_id", meta.recording_id, "api:acd", {})
    assert (paused.status, paused.doc["error"]) == (409, "the call has ended")
    unknown = desk.command("employee", "recording_id", meta.recording_id, "api:acd",
                           {"employee": {"extension": "4242"}})  # fmt: skip
    assert unknown.status == 404


# ---------------------------------------------------------------- mutual TLS on the API


def test_the_api_over_mutual_tls_takes_the_integration_from_the_certificate(
    tmp_path: Path, keys: Keys, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The API with only ca_file/cert_file/key_file: a client certificate of the CA is
    the authentication (its CN names the integration); without one, no TLS session."""
    import http.client
    import ssl

    from agent.directory import LiveDirectory
    from agent.recorder.control.api import ControlServer
    from agent.recorder.control.desk import ControlDesk
    from agent.recorder.uplink.outbox import Outbox

    caplog.set_level("INFO")
    control = {"listen": "127.0.0.1:0", **pki.files("store")}
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", control=control)
    assert cfg.control is not None and cfg.control.tls is not None
    desk = ControlDesk(cfg, LiveDirectory(cfg.directory_file), Outbox(cfg.outbox_dir))
    server = ControlServer(cfg.control, desk).start()
    d = pki.directory
    try:
        context = ssl.create_default_context(cafile=d / "ca.pem")
        context.load_cert_chain(d / "agent-hel-1.pem", d / "agent-hel-1.key")
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        conn.request("GET", "/calls?extension=1001")
        response = conn.getresponse()
        assert response.status == 404  # authenticated: there is just no such call
        assert json.loads(response.read())["error"] == "no call with that extension on this agent"
        conn.close()
        bare = ssl.create_default_context(cafile=d / "ca.pem")
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=bare, timeout=10)
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/calls?extension=1001")
            conn.getresponse()
        conn.close()
    finally:
        server.stop()
    assert "integration=hel-1 op=status" in caplog.text, caplog.text


def test_the_spool_pickup_writes_silence_over_the_pbxs_pauses(tmp_path: Path, keys: Keys) -> None:
    """A PBX that paused but recorded the audio all the same: the capture's legs hold
    silence there, and the pause (by pbx) is in its metadata."""
    from agent.capture import read_meta
    from tests.test_spool import make_spool, rename_in, sidecar, tone, wait_for, wav

    spool = make_spool(tmp_path, keys)
    spool.pickup.start()
    try:
        rename_in(spool.dir / "p-r.wav", wav(tone(440, 3.0)))
        rename_in(spool.dir / "p-t.wav", wav(tone(1000, 3.0, amp=2000)))
        pauses = [{"start": "2026-03-02T09:15:01Z", "end": "2026-03-02T09:15:02Z"}]
        audio = {"customer": "p-r.wav", "employee": "p-t.wav"}
        rename_in(spool.dir / "p.json", sidecar("p", audio, pauses=pauses))
        wait_for(lambda: len(spool.captures()) == 1)
    finally:
        spool.pickup.stop()
        spool.pickup.join(10)
    capture = spool.ready / spool.captures()[0]
    meta = read_meta(capture)
    assert meta.pauses == (Pause("2026-03-02T09:15:01.000Z", "2026-03-02T09:15:02.000Z", "pbx"),)
    assert Flag.PAUSED in meta.flags
    for leg in meta.legs:
        with wave.open(str(capture / leg), "rb") as r:
            samples = struct.unpack(f"<{3 * 8000}h", r.readframes(3 * 8000))
        assert max(map(abs, samples[8000:16000])) == 0, leg
        assert max(map(abs, samples[:8000])) > 1000 and max(map(abs, samples[16000:])) > 1000


def test_a_discarded_capture_left_by_a_dead_worker_keeps_no_audio(
    tmp_path: Path, keys: Keys
) -> None:
    """The worker died right after writing the discard's tombstone (a leg still on
    disk): recovery and finalize make it an outbox entry with the manifest alone."""
    from agent.capture import recover_active, write_meta
    from agent.recorder.finalize import MANIFEST_FILE, Finalizer

    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1")
    active = cfg.captures_dir / "active" / "w0"
    now = utc_now()
    meta = _meta(started_at=iso_ms(now - dt.timedelta(seconds=20)), ended_at=None)
    tomb = call_control.discarded(meta, iso_ms(now))
    capture = active / meta.recording_id
    capture.mkdir(parents=True)
    write_meta(capture, tomb)
    (capture / "customer.wav").write_bytes(b"RIFF" + bytes(100))  # not unlinked yet
    ready = cfg.captures_dir / "ready"
    result = recover_active(active, ready, cfg.quarantine_dir)
    assert result.recovered == [meta.recording_id]
    Finalizer(cfg).handle(meta.recording_id)
    entry = cfg.outbox_dir / meta.recording_id
    assert sorted(p.name for p in entry.iterdir()) == [MANIFEST_FILE]
    assert not (ready / meta.recording_id).exists()
    assert list(tmp_path.rglob("*.wav")) == []
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    assert "discarded" in manifest["flags"] and "size" not in manifest


def test_tokens_are_reloaded_on_sighup_and_a_broken_file_keeps_them(
    tmp_path: Path, keys: Keys
) -> None:
    import http.client

    from agent.directory import LiveDirectory
    from agent.recorder.control.api import ControlServer
    from agent.recorder.control.desk import ControlDesk
    from agent.recorder.uplink.outbox import Outbox

    tokens = tmp_path / "control.tokens"
    first = new_token("crm", tokens)
    control: dict[str, object] = {"listen": "127.0.0.1:0", "tokens_file": str(tokens)}
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", control=control)
    assert cfg.control is not None
    desk = ControlDesk(cfg, LiveDirectory(cfg.directory_file), Outbox(cfg.outbox_dir))
    server = ControlServer(cfg.control, desk).start()

    def status(token: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/calls?extension=1001", headers={"Authorization": f"Bearer {token}"})
        code = conn.getresponse().status
        conn.close()
        return code

    try:
        second = new_token("ivr", tokens)
        assert (status(first), status(second)) == (404, 401)  # 404: in, but no such call
        server.reload_tokens()
        assert (status(first), status(second)) == (404, 404)
        tokens.write_text("broken\n")
        server.reload_tokens()
        assert status(second) == 404
    finally:
        server.stop()
