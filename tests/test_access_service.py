"""The access matrix against the real Access service of an in-process store: each
role and each operation → allowed or refused with the right status, and every request,
allowed or refused, in the audit log. Plus tokens, the directory reload, purposes,
restriction, rectification and the sealed digits."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from agent.cli import access as access_cli
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.store.access.throttle import FailureThrottle
from agent.store.audit import chain as audit
from tests.support.access_world import CUSTOMER, PEOPLE, World, opus_audio, running_world
from tests.support.services import write_store_toml
from tests.support.stack import make_keys

ROLES = {
    "agent own": "a1",
    "agent other": "a2",
    "supervisor own team": "s1",
    "supervisor other team": "s2",
    "admin": "ad",
    "untrained supervisor": "s3",
    "left employee": "x9",
    "privacy officer": "po",
}
A, D, U = "allowed", "denied", "unauthenticated"
OFFICER_ONLY = [D, D, D, D, D, D, U, A]
# Columns in the order of ROLES. Purpose: verification for the first four
# operations, legal for the privacy officer's.
MATRIX: dict[str, list[str]] = {
    "search": [A, A, A, A, A, D, U, A],
    "get": [A, D, A, D, A, D, U, A],
    "play": [A, D, A, D, D, D, U, D],
    "export": [D, D, A, D, D, D, U, D],
    "find_by_number": OFFICER_ONLY,
    "export_package": OFFICER_ONLY,
    "erase": OFFICER_ONLY,
    "restrict": OFFICER_ONLY,
    "unrestrict": OFFICER_ONLY,
    "hold": OFFICER_ONLY,
    "release": OFFICER_ONLY,
    "rectify": OFFICER_ONLY,
    "unseal": OFFICER_ONLY,
}
SEES_IN_SEARCH = {"agent own", "supervisor own team", "admin", "privacy officer"}
MUTATING = {"erase", "restrict", "unrestrict", "hold", "release", "rectify"}
CODES = {
    D: grpc.StatusCode.PERMISSION_DENIED,
    U: grpc.StatusCode.UNAUTHENTICATED,
}
AINO = [("a1", "Aino Agent", "parcels")]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("access")
    for running in running_world(root, make_keys(root / "keys")):
        leaver_call = running.seed([("x9", "Leaving Agent", "parcels")])
        played = running.access.Play(
            apb.RecordingRequest(purpose=apb.PURPOSE_VERIFICATION, recording_id=leaver_call),
            metadata=running.md("x9"),
        )
        assert b"".join(c.data for c in played) == opus_audio(), "x9 heard own call"
        running.rewrite_directory(PEOPLE)  # x9 leaves; the next request must fail
        yield running


@pytest.fixture(scope="module")
def shared(world: World) -> str:
    """Aino's call (team parcels) that the non-mutating cases look at."""
    return world.seed(AINO)


def _req(rid: str, purpose: int, **extra: Any) -> apb.RecordingRequest:
    return apb.RecordingRequest(purpose=purpose, reason="case DSR-7", recording_id=rid, **extra)


def _call(world: World, op: str, person: str, rid: str, started_ms: int) -> Any:
    """One request of ``op`` as ``person``; returns the response (streams joined)."""
    stub: apb_grpc.AccessStub = world.access
    md = world.md(person)
    legal, verification = apb.PURPOSE_LEGAL, apb.PURPOSE_VERIFICATION
    calls: dict[str, Callable[[], Any]] = {
        "search": lambda: stub.Search(apb.SearchRequest(purpose=verification), metadata=md),
        "get": lambda: stub.GetRecording(_req(rid, verification), metadata=md),
        "play": lambda: b"".join(c.data for c in stub.Play(_req(rid, verification), metadata=md)),
        "export": lambda: b"".join(
            c.data for c in stub.Export(_req(rid, verification), metadata=md)
        ),
        "find_by_number": lambda: stub.FindByNumber(_find(started_ms), metadata=md),
        "export_package": lambda: list(
            stub.ExportPackage(
                apb.PackageRequest(purpose=legal, reason="case DSR-7", recording_ids=[rid]),
                metadata=md,
            )
        ),
        "erase": lambda: stub.Erase(_req(rid, legal), metadata=md),
        "restrict": lambda: stub.Restrict(_req(rid, legal), metadata=md),
        "unrestrict": lambda: stub.Unrestrict(_req(rid, legal), metadata=md),
        "hold": lambda: stub.Hold(_req(rid, legal), metadata=md),
        "release": lambda: stub.Release(_req(rid, legal), metadata=md),
        "rectify": lambda: stub.RectifyEmployee(
            apb.RectifyRequest(
                purpose=legal, reason="case DSR-7", recording_id=rid, to_employee_id="a2"
            ),
            metadata=md,
        ),
        "unseal": lambda: stub.OpenSealedDigits(_req(rid, legal), metadata=md),
    }
    return calls[op]()


def _find(started_ms: int) -> apb.FindByNumberRequest:
    at = audit_ts(started_ms + 5 * 60_000)
    return apb.FindByNumberRequest(
        purpose=apb.PURPOSE_LEGAL, reason="case DSR-7", number="040-123 45 67", at=at
    )


def audit_ts(ms: int) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


CASES = [
    pytest.param(op, role, expected, id=f"{op}-{role.replace(' ', '_')}")
    for op, row in MATRIX.items()
    for role, expected in zip(ROLES, row, strict=True)
]


@pytest.mark.parametrize(("op", "role", "expected"), CASES)
def test_access_matrix(world: World, shared: str, op: str, role: str, expected: str) -> None:
    person = ROLES[role]
    rid = world.seed(AINO) if op in MUTATING and expected == A else shared
    row = world.storage.catalog.get(rid)
    assert row is not None
    before = world.head_seq()
    if expected == A:
        response = _call(world, op, person, rid, row.started_at_ms)
        _check_allowed(world, op, role, rid, response)
    else:
        with pytest.raises(grpc.RpcError) as err:
            _call(world, op, person, rid, row.started_at_ms)
        assert err.value.code() == CODES[expected], err.value.details()
    events = [e for e in world.events_after(before) if e["action"] == op]
    assert events, f"{op} by {role} was not audited"
    assert {(e["actor"], e["outcome"]) for e in events} == {(f"person:{person}", expected)}
    if expected != U:
        purpose = "verification" if op in ("search", "get", "play", "export") else "legal"
        assert {e["purpose"] for e in events} == {purpose}


def _check_allowed(world: World, op: str, role: str, rid: str, response: Any) -> None:
    if op == "search":
        found = {v.info.manifest.recording_id for v in response.recordings}
        assert (rid in found) == (role in SEES_IN_SEARCH)
    elif op in ("play", "export"):
        assert response == opus_audio()
    elif op == "get":
        assert response.info.manifest.recording_id == rid
        assert not response.info.manifest.customer.digest, "no digest leaves the store"
    elif op == "find_by_number":
        assert rid in {v.info.manifest.recording_id for v in response.recordings}
    elif op == "export_package":
        audio = b"".join(c.file.data for c in response if c.WhichOneof("kind") == "file")
        assert audio == opus_audio() and response[0].WhichOneof("kind") == "metadata_json"
    elif op == "erase":
        assert response.changed and world.storage.catalog.get(rid) is None
    elif op == "unseal":
        assert response.last_digits == "567" and response.customer_masked == "+358401234***"
    else:
        assert response.recording_id == rid


# ---------------------------------------------------------------- beyond the matrix


def test_admin_hears_audio_only_for_security(world: World, shared: str) -> None:
    md = world.md("ad")
    with pytest.raises(grpc.RpcError) as err:
        b"".join(c.data for c in world.access.Play(_req(shared, apb.PURPOSE_TRAINING), metadata=md))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    played = world.access.Play(_req(shared, apb.PURPOSE_SECURITY), metadata=md)
    assert b"".join(c.data for c in played) == opus_audio()


def test_officer_plays_for_legal_purpose_only(world: World, shared: str) -> None:
    played = world.access.Export(_req(shared, apb.PURPOSE_LEGAL), metadata=world.md("po"))
    assert b"".join(c.data for c in played) == opus_audio()


def test_untrained_agent_gets_nothing(world: World) -> None:
    """The notice: admins *and* agents with their supervisors must be trained."""
    own = world.seed([("a3", "Untrained Agent", "parcels")])
    with pytest.raises(grpc.RpcError) as err:
        world.access.GetRecording(_req(own, apb.PURPOSE_VERIFICATION), metadata=world.md("a3"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "training" in (err.value.details() or "")


def test_decisions_are_counted_by_role_operation_and_outcome(world: World) -> None:
    """The store's /metrics: callrec_access_requests_total{role, operation, outcome}."""

    def counted(role: str, outcome: str) -> float:
        labels = {"role": role, "operation": "get", "outcome": outcome}
        return REGISTRY.get_sample_value("callrec_access_requests_total", labels) or 0.0

    rid = world.seed([("a3", "Untrained Agent", "parcels")])
    before = counted("agent", "denied"), counted("supervisor", "allowed")
    with pytest.raises(grpc.RpcError):
        world.access.GetRecording(_req(rid, apb.PURPOSE_VERIFICATION), metadata=world.md("a3"))
    world.access.GetRecording(_req(rid, apb.PURPOSE_VERIFICATION), metadata=world.md("s1"))
    assert counted("agent", "denied") == before[0] + 1
    assert counted("supervisor", "allowed") == before[1] + 1


def test_restricted_recording_is_played_only_by_the_officer_for_legal(world: World) -> None:
    rid = world.seed(AINO, restricted=True)
    view = world.access.GetRecording(_req(rid, apb.PURPOSE_VERIFICATION), metadata=world.md("s1"))
    assert view.restricted
    refused = [("a1", apb.PURPOSE_VERIFICATION), ("s1", apb.PURPOSE_TRAINING),
               ("ad", apb.PURPOSE_SECURITY), ("po", apb.PURPOSE_VERIFICATION)]  # fmt: skip
    for person, purpose in refused:
        with pytest.raises(grpc.RpcError) as err:
            b"".join(
                c.data for c in world.access.Export(_req(rid, purpose), metadata=world.md(person))
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, person
    played = world.access.Play(_req(rid, apb.PURPOSE_LEGAL), metadata=world.md("po"))
    assert b"".join(c.data for c in played) == opus_audio()
    world.access.Unrestrict(_req(rid, apb.PURPOSE_LEGAL), metadata=world.md("po"))
    played = world.access.Play(_req(rid, apb.PURPOSE_VERIFICATION), metadata=world.md("a1"))
    assert b"".join(c.data for c in played) == opus_audio()


@pytest.mark.parametrize(
    ("header", "actor"),
    [(None, "anonymous"), ("Bearer nonsense", "anonymous"), ("Basic abc", "anonymous"),
     ("Bearer crt1.0123456789abcdef." + "A" * 43, "token:0123456789abcdef")],
)  # fmt: skip
def test_bad_tokens_are_unauthenticated_and_audited(
    world: World, shared: str, header: str | None, actor: str
) -> None:
    md = () if header is None else (("authorization", header),)
    world.access_service.trail.throttle = FailureThrottle()  # a new minute for this source
    before = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        world.access.GetRecording(_req(shared, apb.PURPOSE_VERIFICATION), metadata=md)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [event] = world.events_after(before)
    assert (event["actor"], event["outcome"], event["recording_id"]) == (
        actor, "unauthenticated", shared,
    )  # fmt: skip


def _cli(*argv: str) -> int | None:
    parser = argparse.ArgumentParser(prog="callrec")
    sub = parser.add_subparsers(dest="command", required=True)
    access_cli.add_parsers(sub)
    return access_cli.dispatch(parser.parse_args(list(argv)))


def test_cli_token_create_use_and_revoke(
    world: World, shared: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_store_toml(tmp_path / "store.toml", world.doc["store"])
    assert _cli("access", "token", "create", "--config", str(config), "--person", "s1") == 0
    token = capsys.readouterr().out.splitlines()[-1]
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    client = ["--store", world.store.address, "--token-file", str(token_file)]
    assert _cli("show", shared, "--purpose", "training", *client) == 0
    assert shared in capsys.readouterr().out
    token_id = token.split(".")[1]
    assert _cli("access", "token", "revoke", "--config", str(config), "--token-id", token_id) == 0
    assert _cli("show", shared, "--purpose", "training", *client) == 1
    assert "UNAUTHENTICATED: authentication failed: revoked token" in capsys.readouterr().err
    with world.storage.catalog.engine.connect() as conn:
        stored = "\n".join(str(r) for r in conn.exec_driver_sql("SELECT * FROM access_tokens"))
    assert token.split(".")[2] not in stored, "only the hash of the secret is kept"


def test_purpose_and_reason_are_required(world: World, shared: str) -> None:
    before = world.head_seq()
    with pytest.raises(grpc.RpcError) as err:
        world.access.GetRecording(
            apb.RecordingRequest(recording_id=shared), metadata=world.md("a1")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        world.access.Hold(
            apb.RecordingRequest(purpose=apb.PURPOSE_LEGAL, recording_id=shared),
            metadata=world.md("po"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in (err.value.details() or "")
    outcomes = [(e["actor"], e["action"], e["outcome"]) for e in world.events_after(before)]
    assert outcomes == [("person:a1", "get", "refused"), ("person:po", "hold", "refused")]


def test_search_filters_and_scope(world: World) -> None:
    transfer = world.seed([("a2", "Mikko Agent", "telesales"), ("a1", "Aino Agent", "parcels")],
                          flags="silent_customer")  # fmt: skip

    def found(person: str, **filters: Any) -> set[str]:
        request = apb.SearchRequest(purpose=apb.PURPOSE_TRAINING, limit=1000, **filters)
        response = world.access.Search(request, metadata=world.md(person))
        return {v.info.manifest.recording_id for v in response.recordings}

    assert transfer in found("a1") and transfer in found("a2"), "both agents were on the call"
    assert transfer in found("s1") and transfer in found("s2")
    assert found("a1", flags=["silent_customer"]) == {transfer}
    assert found("ad", employee_id="a2", team="telesales") >= {transfer}
    assert transfer in found("ad", customer_masked="+358 401234***")
    assert transfer not in found("ad", customer_masked="+358409999***")


def test_rectify_moves_the_call_to_the_right_agent(world: World) -> None:
    rid = world.seed(AINO)
    rectify = apb.RectifyRequest(
        purpose=apb.PURPOSE_LEGAL, reason="employee complaint 12", recording_id=rid,
        from_employee_id="a1", to_employee_id="a2",
    )  # fmt: skip
    assert world.access.RectifyEmployee(rectify, metadata=world.md("po")).changed
    view = world.access.GetRecording(_req(rid, apb.PURPOSE_VERIFICATION), metadata=world.md("a2"))
    assert [(e.id, e.name, e.team) for e in view.info.manifest.employees] == [
        ("a2", "Mikko Agent", "telesales")
    ]
    with pytest.raises(grpc.RpcError) as err:
        world.access.GetRecording(_req(rid, apb.PURPOSE_VERIFICATION), metadata=world.md("a1"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with world.storage.catalog.engine.connect() as conn:
        [event] = [e for e in audit.events_for(conn, rid) if e.action == "rectify"]
    assert "from=a1 to=a2" in event.detail and event.reason == "employee complaint 12"


def test_unseal_is_audited_with_its_reason_and_never_logs_the_digits(
    world: World, shared: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    request = _req(shared, apb.PURPOSE_LEGAL)
    request.reason = "court order 2026-04 for +358 40 123 4567"
    sealed = world.access.OpenSealedDigits(request, metadata=world.md("po"))
    assert sealed.customer_masked[:-3] + sealed.last_digits == CUSTOMER.replace(" ", "")
    with world.storage.catalog.engine.connect() as conn:
        [event] = [e for e in audit.events_for(conn, shared) if e.reason.startswith("court")]
    assert event.actor == "person:po" and event.purpose == "legal"
    assert event.reason == "court order 2026-04 for [number removed]"
    assert "1234567" not in caplog.text and "123 4567" not in caplog.text


def test_an_unreadable_directory_fails_closed(world: World, shared: str) -> None:
    good = world.directory.read_text()
    world.rewrite_directory(good + "\n[[person]]\nid = 'broken'\n")
    try:
        with pytest.raises(grpc.RpcError) as err:
            world.access.GetRecording(_req(shared, apb.PURPOSE_TRAINING), metadata=world.md("s1"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        world.rewrite_directory(good)
    view = world.access.GetRecording(_req(shared, apb.PURPOSE_TRAINING), metadata=world.md("s1"))
    assert view.info.manifest.recording_id == shared
