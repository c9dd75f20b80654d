"""Sessions of the people's web that outlive the process and the ID token: a restart
of `callrec web` signs nobody out, an ID token about to expire is renewed with the
provider's refresh grant while the session lives, and sign-out revokes the refresh
token at the provider. Real Chromium, real `callrec web`, real store, real
oidc-provider whose ID tokens live 12 s (the store allows 1 s of clock skew)."""

from __future__ import annotations

import json
import sqlite3
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.access_world import opus_audio
from tests.support.web import CHROMIUM, CLIENT_ID, WebWorld, day_ms, running_web, seed_audio
from tests.test_web import pytestmark as web_mark
from tests.test_web import session_cookie, shot, sign_in

pytestmark = web_mark
AINO: list[tuple[str, str, str | None]] = [("a1", "Aino Agent", "parcels")]
TTL_S = 12


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebWorld]:
    yield from running_web(tmp_path_factory.mktemp("web-sessions"), TTL_S, leeway="1s")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _refresh_tokens(web: WebWorld, person: str) -> list[str]:
    """The refresh tokens the web keeps for ``person`` (its sessions file)."""
    assert web.state_dir is not None
    with sqlite3.connect(web.state_dir / "sessions.db") as db:
        rows = [json.loads(d) for (d,) in db.execute("SELECT data FROM sessions")]
    return [r["refresh_token"] for r in rows if r.get("person", {}).get("id") == person]


def _refresh_grant(web: WebWorld, refresh_token: str) -> tuple[int, dict[str, Any]]:
    """The refresh grant asked of the provider directly, as the web's client."""
    ctx = ssl.create_default_context(cafile=str(web.ca_file))
    with urllib.request.urlopen(
        web.issuer + "/.well-known/openid-configuration", context=ctx, timeout=10
    ) as found:
        endpoint = json.loads(found.read())["token_endpoint"]
    secret = (web.world.root / "client-secret").read_text()
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "client_id": CLIENT_ID, "client_secret": secret}  # fmt: skip
    request = urllib.request.Request(endpoint, urllib.parse.urlencode(form).encode())
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_sessions_survive_a_restart_of_the_web(web: WebWorld, browser: Any) -> None:
    rid = seed_audio(web.world, AINO, opus_audio(), day_ms(1))
    page = sign_in(browser, web, "a1")
    page.goto(f"{web.url}/recordings/{rid}")
    page.select_option("#purpose", "verification")
    page.click("#start")
    page.wait_for_selector("audio")
    cookie = session_cookie(page)
    seq = web.world.head_seq()
    old_pid = web.web_pid
    web.restart()
    assert web.web_pid != old_pid
    # The same browser, after the restart: still signed in, the purpose still chosen.
    page.goto(f"{web.url}/recordings/{rid}")
    assert page.url.endswith(f"/recordings/{rid}")
    assert page.locator("audio").count() == 1, "the chosen purpose survived too"
    page.wait_for_function("() => document.getElementById('audio')?.readyState >= 1")
    assert session_cookie(page) == cookie, "the same session"
    assert "sign_in" not in [e["action"] for e in web.world.events_after(seq)]
    # A forged cookie is still nobody.
    status, headers, _ = web.get("/search", cookie[:-4] + "AAAA")
    assert status == 303 and headers["location"] == "/"
    # Sign-out (its CSRF token came back with the session) ends it for good.
    page.click("form[action='/signout'] button")
    page.wait_for_load_state("networkidle")
    status, headers, _ = web.get("/search", cookie)
    assert status == 303 and headers["location"] == "/"
    page.context.close()


def test_the_id_token_is_refreshed_and_sign_out_revokes(web: WebWorld, browser: Any) -> None:
    seed_audio(web.world, AINO, opus_audio(), day_ms(2))
    page = sign_in(browser, web, "a1")
    signed_in_at = time.monotonic()
    assert page.url.endswith("/search")
    (refresh,) = _refresh_tokens(web, "a1")
    assert refresh, "the provider gave a refresh token (scope offline_access)"
    seq = web.world.head_seq()
    time.sleep(max(0.0, signed_in_at + TTL_S + 3 - time.monotonic()))
    # The first ID token has expired (the store would refuse it): the page still comes,
    # without a trip to the provider's sign-in.
    page.goto(web.url + "/search")
    assert page.url == web.url + "/search"
    assert "Omat puheluni" in page.inner_text("h1")
    assert page.locator("table.results tbody tr").count() >= 1
    events = web.world.events_after(seq)
    searches = [e for e in events if e["action"] == "search"]
    assert searches and all(
        e["actor"] == "person:a1" and e["outcome"] == "allowed" for e in searches
    )
    assert not [e for e in events if e["action"] == "sign_in"], "no second sign-in"
    assert "web_token_refreshed" in web.web_log.read_text()
    shot(page, "search-after-refresh")
    # The kept refresh token is live at the provider until sign-out, dead after it.
    assert _refresh_grant(web, refresh)[0] == 200
    page.click("form[action='/signout'] button")
    page.wait_for_load_state("networkidle")
    status, answer = _refresh_grant(web, refresh)
    assert status == 400 and answer["error"] == "invalid_grant"
    assert _refresh_tokens(web, "a1") == [], "the session is gone from the file too"
    page.context.close()


def test_a_callback_that_answers_no_sign_in_of_ours_gets_no_session(web: WebWorld) -> None:
    # No sign-in under way: refused.
    status, headers, _ = web.get("/auth/callback?code=abc&state=xyz")
    assert status == 400 and "set-cookie" not in headers
    # A sign-in under way: the provider's address carries PKCE S256, state and nonce.
    status, headers, _ = web.get("/signin")
    assert status == 302
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["nonce"][0] and query["scope"] == ["openid offline_access"]
    cookie = headers["set-cookie"].split(";")[0]
    state = query["state"][0]
    # Another sign-in's state, then a code the provider never gave: no session either
    # way (and the first refusal ends the sign-in under way).
    assert web.get(f"/auth/callback?code=abc&state={state}x", cookie)[0] == 400
    status, headers, _ = web.get("/signin", cookie)
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["location"]).query)["state"][0]
    assert web.get(f"/auth/callback?code=forged&state={state}", cookie)[0] == 400
    assert web.get("/search", cookie)[0] == 303, "still nobody"
