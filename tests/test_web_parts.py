"""The web's pure parts: Range headers, the language pick, Finnish dates and offsets,
sessions' idle timeout, and the [web] / [store.oidc] config with its error messages."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.config import ConfigError, store_config_from_dict
from agent.pb.callrec.v1 import access_pb2
from agent.store.server import MIN_CLIENT_PING_INTERVAL_MS
from agent.web import store_client, timefmt
from agent.web.audio import BadRange, parse_range
from agent.web.config import web_config_from_dict
from agent.web.i18n import pick_language
from agent.web.signin.sessions import SessionStore, csrf_ok, csrf_token

HELSINKI = ZoneInfo("Europe/Helsinki")


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", None, (0, 99)),
        ("bytes=100-", None, (100, None)),
        ("bytes=-10", 50, (40, None)),
        ("bytes=-100", 50, (0, None)),
        ("bytes=0-10, 5-20", None, (0, 20)),
        ("bytes=5-20,0-10,21-30", None, (0, 30)),
        ("bytes=0-10,8-", None, (0, None)),
    ],
)
def test_ranges_served(header: str, size: int | None, expected: tuple[int, int | None]) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", ["bytes=0-10,20-30", "bytes=9-3", "bytes=a-b", "bytes=-", "lines=0-1", "bytes="]
)
def test_ranges_refused(header: str) -> None:
    with pytest.raises(BadRange):
        parse_range(header, 1000)


@pytest.mark.parametrize(
    ("header", "lang"),
    [
        ("", "fi"),
        ("en-GB,en;q=0.9", "en"),
        ("sv-FI,sv;q=0.9,en;q=0.8,fi;q=0.7", "en"),
        ("de-DE", "fi"),
        ("en;q=0.5,fi;q=0.6", "fi"),
        ("en;q=bogus", "fi"),
    ],
)
def test_language_pick(header: str, lang: str) -> None:
    assert pick_language(header) == lang


def test_finnish_dates_and_offsets() -> None:
    winter = timefmt.parse_local("27.11.2026 14:30", HELSINKI)
    assert winter == dt.datetime(2026, 11, 27, 12, 30, tzinfo=dt.UTC)
    assert timefmt.show(winter, HELSINKI) == "27.11.2026 14:30:00 (UTC+02:00)"
    summer = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)
    assert timefmt.show(summer, HELSINKI) == "01.06.2026 12:00:00 (UTC+03:00)"
    assert timefmt.parse_local("1.6.2026", HELSINKI, end_of_day=True) == dt.datetime(
        2026, 6, 2, tzinfo=HELSINKI
    )
    assert timefmt.parse_local("  ", HELSINKI) is None
    for bad in ("2026-11-27", "31.02.2026", "27.11.2026 25:00", "27/11/2026"):
        with pytest.raises(timefmt.TimeInputError):
            timefmt.parse_local(bad, HELSINKI)


def test_sessions_end_when_idle_and_csrf_is_per_session() -> None:
    now = [0.0]
    store = SessionStore(idle_s=60, clock=lambda: now[0])
    sid = store.put({"person": {"id": "a1"}})
    now[0] = 59
    assert store.get(sid) is not None, "used within the idle time"
    now[0] = 118
    assert store.get(sid) is not None, "each use renews it"
    now[0] = 179
    assert store.get(sid) is None, "idle for more than 60 s: gone"
    first, second = {"person": 1}, {"person": 2}
    # Full: a flood of sign-in starts pushes out its own kind, not people signed in.
    from agent.web.signin import sessions

    small = SessionStore(idle_s=600, clock=lambda: now[0])
    sessions_before = sessions.MAX_SESSIONS
    sessions.MAX_SESSIONS = 3
    try:
        person = small.put({"person": {"id": "a1"}})
        flood = [small.put({"_state": n}) for n in range(5)]
        assert small.get(person) is not None and small.get(flood[-1]) is not None
        assert small.get(flood[0]) is None
    finally:
        sessions.MAX_SESSIONS = sessions_before
    token = csrf_token(first)
    assert csrf_ok(first, token) and not csrf_ok(second, token) and not csrf_ok(first, "")


def test_sessions_on_disk_outlive_the_process_but_not_the_idle_timeout(tmp_path: Path) -> None:
    now = [1_000_000.0]
    state = tmp_path / "state"
    first = SessionStore(idle_s=600, state_dir=state, clock=lambda: now[0])
    kept = first.put({"person": {"id": "a1"}, "id_token": "t1", "purposes": {}})
    idle = first.put({"person": {"id": "a2"}})
    gone = first.put({"person": {"id": "a3"}})
    first.drop(gone)
    now[0] += 300
    session = first.get(kept)
    assert session is not None
    session["purposes"] = {"ab" * 16: "verification"}
    first.save(kept)
    first.close()
    assert (state / "session.key").stat().st_mode & 0o777 == 0o600
    assert (state / "sessions.db").stat().st_mode & 0o777 == 0o600
    assert kept.encode() not in (state / "sessions.db").read_bytes(), "ids are kept hashed"
    # A new process 9 minutes after the first use: a1 (used at 5 min) is still there
    # with its change; a2 (idle since 0) has been idle too long; a3 signed out.
    now[0] += 301
    second = SessionStore(idle_s=600, state_dir=state, clock=lambda: now[0])
    again = second.get(kept)
    assert again is not None and again["purposes"] == {"ab" * 16: "verification"}
    assert second.get(idle) is None and second.get(gone) is None
    second.close()
    # A row edited on disk (a role raised, say) no longer verifies: dropped.
    import sqlite3

    with sqlite3.connect(state / "sessions.db") as db:
        db.execute("UPDATE sessions SET data = replace(data, 'a1', 'po')")
    third = SessionStore(idle_s=600, state_dir=state, clock=lambda: now[0])
    assert third.get(kept) is None
    third.close()
    # Idle across a restart: gone when the process comes back too late.
    fourth = SessionStore(idle_s=600, state_dir=state, clock=lambda: now[0])
    late = fourth.put({"person": {"id": "a1"}})
    fourth.close()
    now[0] += 601
    assert SessionStore(idle_s=600, state_dir=state, clock=lambda: now[0]).get(late) is None
    # A damaged file (not a database) is set aside: the web starts, with no sessions.
    for extra in state.glob("sessions.db*"):
        extra.unlink()
    (state / "sessions.db").write_bytes(b"this is not a database" * 100)
    fresh = SessionStore(idle_s=600, state_dir=state, clock=lambda: now[0])
    assert fresh.get(late) is None and fresh.get(fresh.put({"a": 1})) == {"a": 1}
    assert len(list(state.glob("sessions.db.damaged-*"))) == 1
    fresh.close()


def web_doc(tmp_path: Path, **web: object) -> dict[str, object]:
    return {
        "web": {
            "tls_cert": "web.pem",
            "tls_key": "web.key",
            **web,
            "oidc": {
                "issuer": "https://login.example.fi/tenant/v2.0",
                "client_id": "callrec-web",
                "client_secret_file": "secret",
            },
        }
    }


def test_web_config(tmp_path: Path) -> None:
    cfg = web_config_from_dict(web_doc(tmp_path), tmp_path)
    assert cfg.listen == "127.0.0.1:8443" and cfg.session_idle_s == 1800
    assert cfg.oidc.client_secret_file == tmp_path / "secret"
    assert cfg.time_zone == "Europe/Helsinki"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"session_idle": "soon"}, '[web] session_idle = "soon": expected a duration'),
        ({"time_zone": "Mars/Olympus"}, '[web] time_zone = "Mars/Olympus": expected an IANA'),
        ({"store_address": "10.0.0.5:50052"}, "[web] store_ca_file = None: expected the CA"),
        ({"colour": "blue"}, "[web] colour: unknown key"),
        ({"listen": "everywhere"}, '[web] listen = "everywhere": expected an address'),
    ],
)
def test_web_config_errors_name_the_key(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        web_config_from_dict(web_doc(tmp_path, **change), tmp_path)
    assert str(err.value).startswith(message)


def test_web_config_needs_https_issuer(tmp_path: Path) -> None:
    doc = web_doc(tmp_path)
    doc["web"]["oidc"]["issuer"] = "http://login.example.fi"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"\[web.oidc\] issuer = \"http://login.example.fi\""):
        web_config_from_dict(doc, tmp_path)


def test_store_oidc_config(tmp_path: Path) -> None:
    doc = {"store": {"data_dir": "d", "oidc": {"issuer": "https://idp.example", "audience": "w"}}}
    oidc = store_config_from_dict(doc, tmp_path).oidc
    assert oidc is not None and oidc.audience == ("w",) and oidc.person_claim == "sub"
    doc["store"]["oidc"]["issuer"] = "http://idp.example"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"\[store.oidc\] issuer"):
        store_config_from_dict(doc, tmp_path)
    doc["store"]["oidc"] = {"issuer": "https://idp.example"}
    with pytest.raises(ConfigError, match=r"\[store.oidc\] audience: missing"):
        store_config_from_dict(doc, tmp_path)


def test_local_sign_in_is_for_a_loopback_demo_only(tmp_path: Path) -> None:
    doc = web_doc(tmp_path)
    del doc["web"]["oidc"]  # type: ignore[attr-defined]
    doc["web"]["local"] = {"people": ["e1001"]}  # type: ignore[index]
    assert web_config_from_dict(doc, tmp_path).local_people == ("e1001",)
    doc["web"]["listen"] = "0.0.0.0:8443"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"\[web.local\] people .*loopback listen"):
        web_config_from_dict(doc, tmp_path)
    del doc["web"]["local"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"\[web.oidc\]: missing"):
        web_config_from_dict(doc, tmp_path)


def test_callrec_web_check_names_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli.main import main

    (tmp_path / "web.pem").write_text("cert")
    (tmp_path / "web.key").write_text("key")
    config = tmp_path / "web.toml"
    config.write_text(
        '[web]\ntls_cert = "web.pem"\ntls_key = "web.key"\n\n[web.oidc]\n'
        'issuer = "https://login.example.fi"\nclient_id = "w"\nclient_secret_file = "secret"\n'
    )
    assert main(["web", "--config", str(config), "--check"]) == 2
    assert "[web.oidc] client_secret_file" in capsys.readouterr().err
    (tmp_path / "secret").write_text("s")
    assert main(["web", "--config", str(config), "--check"]) == 0
    # The sessions' directory must be writable (here: a path under a file).
    text = config.read_text().replace("[web.oidc]", 'state_dir = "web.pem/sessions"\n\n[web.oidc]')
    config.write_text(text)
    capsys.readouterr()
    assert main(["web", "--config", str(config), "--check"]) == 2
    assert "[web] state_dir" in capsys.readouterr().err


def test_id_token_claims_and_when_to_refresh() -> None:
    import base64
    import json

    from agent.web.signin.oidc import OidcError, claims_of, refresh_due

    body = base64.urlsafe_b64encode(json.dumps({"sub": "a1", "nonce": "n"}).encode()).rstrip(b"=")
    assert claims_of(f"h.{body.decode()}.s") == {"sub": "a1", "nonce": "n"}
    for garbage in ("", "no-dots", "a.!!!.c", "a.WzFd.c"):  # WzFd: a JSON list, not an object
        with pytest.raises(OidcError):
            claims_of(garbage)
    # An hour's token: refreshed in its last minute; a 12 s token in its last third.
    assert not refresh_due(0, 3600, 3539) and refresh_due(0, 3600, 3540)
    assert not refresh_due(0, 12, 7.9) and refresh_due(0, 12, 8)
    assert refresh_due(0, 0, 0), "a token without iat/exp is refreshed when it can be"


def test_the_store_channel_retries_reads_only_and_pings_as_the_store_permits() -> None:
    """A misspelt method name would silently turn its retry off; a change asked again
    could be done twice; pings more often than the store allows get a GOAWAY."""
    methods = access_pb2.DESCRIPTOR.services_by_name["Access"].methods_by_name
    options = dict(store_client.CHANNEL_OPTIONS)
    policy = json.loads(str(options["grpc.service_config"]))["methodConfig"]
    retried = {n["method"] for config in policy for n in config["name"]}
    assert retried == set(store_client.RETRIED_READS) and retried <= set(methods)
    changes = {"Erase", "Restrict", "Unrestrict", "Hold", "Release", "RectifyEmployee",
               "OpenSealedDigits", "Export", "ExportPackage"}  # fmt: skip
    assert changes <= set(methods) and not retried & changes
    assert int(options["grpc.keepalive_time_ms"]) >= MIN_CLIENT_PING_INTERVAL_MS
