"""The people's web end to end: a real Chromium (Debian's, through Playwright) against
`callrec web` (its own process, HTTPS), the real store (Access service, vault, audit)
and a real OpenID provider (npm oidc-provider). Screenshots of each page go to
tests/artifacts/web/ (CALLREC_ARTIFACTS)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.pb.callrec.v1 import access_pb2 as apb
from tests.support.access_world import opus_audio
from tests.support.web import (
    ARTIFACTS,
    CHROMIUM,
    WebWorld,
    day_ms,
    launch_chromium,
    long_opus,
    node_ready,
    running_web,
    seed_audio,
)

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and node_ready()), reason="needs chromium and tests/oidc (.ci/setup)"
)
AINO = [("a1", "Aino Agent", "parcels")]
MIKKO = [("a2", "Mikko Agent", "telesales")]
COOKIE = "__Host-callrec"


@dataclass(frozen=True)
class Calls:
    aino: list[str]
    long: str
    mikko: str


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebWorld]:
    yield from running_web(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def calls(web: WebWorld) -> Calls:
    short = opus_audio()
    aino = [seed_audio(web.world, AINO, short, day_ms(1 + i)) for i in range(6)]
    long = seed_audio(web.world, AINO, long_opus(420), day_ms(0.5), 420, flags="silent_customer")
    mikko = seed_audio(web.world, MIKKO, short, day_ms(0.7))
    return Calls(aino, long, mikko)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_chromium()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(browser: Any, web: WebWorld, account: str, locale: str = "fi-FI") -> Any:
    context = browser.new_context(
        ignore_https_errors=True, locale=locale, viewport={"width": 1366, "height": 768}
    )
    page = context.new_page()
    page.goto(web.url + "/")
    page.click("a.button")  # "Kirjaudu sisään" / "Sign in"
    page.wait_for_url(re.compile(r".*/interaction/.*"))
    page.fill("#login", account)
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    return page


def session_cookie(page: Any) -> str:
    cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
    return f"{COOKIE}={cookie['value']}"


def employees_shown(page: Any) -> list[str]:
    return page.locator("table.results tbody tr td:nth-child(5)").all_inner_texts()


def test_agent_sees_own_calls_plays_seeks_and_cannot_download(
    web: WebWorld, calls: Calls, browser: Any
) -> None:
    page = sign_in(browser, web, "a1")
    shot(page, "search-agent")
    assert page.url.endswith("/search") and "Omat puheluni" in page.inner_text("h1")
    first = employees_shown(page)
    assert len(first) == 5 and all(e == "Aino Agent" for e in first)
    assert re.search(
        r"\d\d\.\d\d\.\d{4} \d\d:\d\d:\d\d \(UTC\+0[23]:00\)", page.inner_text("table")
    )
    page.click("a[rel=next]")  # paging past the first page
    second = employees_shown(page)
    assert len(second) == 2 and all(e == "Aino Agent" for e in second)
    assert calls.mikko not in page.content()

    seq = web.world.head_seq()
    page.goto(f"{web.url}/recordings/{calls.long}")
    assert page.locator("audio").count() == 0, "no player before a purpose is chosen"
    shot(page, "recording-purpose")
    page.select_option("#purpose", "verification")
    page.click("#start")
    ranges: list[tuple[int, str]] = []
    page.on(
        "response",
        lambda r: (
            ranges.append((r.status, r.headers.get("content-range", "")))
            if "/audio" in r.url
            else None
        ),
    )
    page.wait_for_function("() => document.getElementById('audio')?.readyState >= 1")
    assert page.evaluate("document.getElementById('audio').duration") == pytest.approx(420, abs=1)
    page.evaluate("document.getElementById('audio').play()")
    page.wait_for_function("() => document.getElementById('audio')?.currentTime > 0.3")
    page.evaluate("document.getElementById('audio').currentTime = 300")
    page.wait_for_function(
        "() => { const a = document.getElementById('audio');"
        " return a.currentTime >= 300.2 && !a.seeking; }",
        timeout=15_000,
    )
    assert page.is_hidden("#audio-error")
    page.check("input[name=solo][value=customer]")
    assert page.evaluate("document.body.dataset.solo") == "customer"
    page.evaluate("document.getElementById('audio').pause()")
    shot(page, "recording-player")
    assert ranges and all(status == 206 for status, _ in ranges)
    offsets = [int(cr.split()[1].split("-")[0]) for _, cr in ranges if cr]
    assert 0 in offsets and max(offsets) > 0, f"a seek asks for a later range: {ranges}"
    # No download for an agent: no link, no download control, and the store refuses export.
    with pytest.raises(grpc.RpcError) as export:
        list(
            web.world.access.Export(
                apb.RecordingRequest(purpose=apb.PURPOSE_VERIFICATION, recording_id=calls.long),
                metadata=[("authorization", f"Bearer {web.signer.token('a1')}")],
            )
        )
    assert export.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "nodownload" in (page.get_attribute("audio", "controlslist") or "")
    assert page.locator("a[download], a[href*=export]").count() == 0
    plays = [
        e for e in web.world.events_after(seq)
        if e["action"] == "play" and e["recording_id"] == calls.long
    ]  # fmt: skip
    assert plays and all(
        e["actor"] == "person:a1" and e["purpose"] == "verification" and e["outcome"] == "allowed"
        and (e["detail"].startswith("channel=web bytes=") or e["detail"] == "channel=web waveform")
        for e in plays
    )  # fmt: skip
    assert any(e["detail"].startswith("channel=web bytes=") for e in plays)
    page.context.close()


def test_supervisor_sees_the_team_in_english(web: WebWorld, calls: Calls, browser: Any) -> None:
    page = sign_in(browser, web, "s1", locale="en-GB")
    assert "My team's calls" in page.inner_text("h1")
    page.fill("input[name=employee]", "a1")
    page.click("form.filters button")
    assert set(employees_shown(page)) == {"Aino Agent"}
    page.goto(f"{web.url}/search?employee=a2")
    assert employees_shown(page) == []
    page.goto(f"{web.url}/search")
    page.select_option("select[name=flag]", "silent_customer")
    page.fill("input[name=service]", "+358 100 5577")
    page.click("form.filters button")
    assert employees_shown(page) == ["Aino Agent"], "only the call flagged silent customer"
    assert "customer channel silent" in page.inner_text("table.results")
    shot(page, "search-supervisor")
    page.fill("input[name=customer]", "040 123 4567")  # a full number, not a masked one
    page.click("form.filters button")
    assert "customer" in page.inner_text("p.error") and "4567" not in page.url
    assert "123 4567" not in page.content()
    page.goto(f"{web.url}/search?service=%2B358999999")
    assert employees_shown(page) == []
    page.goto(f"{web.url}/cases")
    assert "for the privacy officer" in page.inner_text("main")
    page.goto(f"{web.url}/recordings/{calls.aino[0]}")
    assert "Destroyed on" in page.inner_text("dl.facts")
    # A transferred call: Mikko answered, Aino took over; both with their join times.
    started = (day_ms(3.2) // 1000) * 1000
    joined = [dt.datetime.fromtimestamp((started + ms) / 1000, dt.UTC) for ms in (0, 95_000)]
    people = json.dumps([
        {"id": i, "name": n, "team": t, "joined_at": j.isoformat()}
        for (i, n, t), j in zip(MIKKO + AINO, joined, strict=True)
    ])  # fmt: skip
    transferred = seed_audio(web.world, MIKKO, opus_audio(), started, employees_json=people)
    page.goto(f"{web.url}/recordings/{transferred}")
    helsinki = [j.astimezone(ZoneInfo("Europe/Helsinki")) for j in joined]
    assert page.locator("dl.facts li").all_inner_texts() == [
        f"Mikko Agent (telesales) — joined {helsinki[0]:%d.%m.%Y %H:%M:%S} (UTC+02:00)",
        f"Aino Agent (parcels) — joined {helsinki[1]:%d.%m.%Y %H:%M:%S} (UTC+02:00)",
    ]
    page.select_option("#purpose", "training")
    page.click("#start")
    page.select_option("#speed", "1.5")
    assert page.evaluate("document.getElementById('audio').playbackRate") == 1.5
    shot(page, "recording-transferred")
    cookie = session_cookie(page)
    page.click("header form button")  # sign out (a POST with the CSRF token)
    assert "You have signed out." in page.inner_text("main")
    assert web.get("/search", cookie)[0] == 303, "the old session id is dead"
    page.context.close()


def test_outsider_and_untrained_are_turned_away(web: WebWorld, calls: Calls, browser: Any) -> None:
    page = sign_in(browser, web, "nobody")
    assert "ei ole puhelutallenteiden henkilöluettelossa" in page.inner_text("main")
    shot(page, "refused-outsider")
    page.goto(web.url + "/search")
    assert page.url.rstrip("/") == web.url, "no session: back to the front page"
    page.context.close()
    page = sign_in(browser, web, "a3", locale="en-US")
    assert "no training date" in page.inner_text("main")
    page.context.close()


def test_store_refuses_forged_expired_and_foreign_tokens(web: WebWorld) -> None:
    access, signer = web.world.access, web.signer
    good = signer.token("a1")
    assert (
        access.WhoAmI(apb.WhoAmIRequest(), metadata=[("authorization", f"Bearer {good}")]).id
        == "a1"
    )
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {"iss": signer.issuer, "sub": "po", "aud": "callrec-web", "iat": 0, "exp": 2**31},
        forger, "RS256", headers={"kid": signer.kid},
    )  # fmt: skip
    seq = web.world.head_seq()
    for token, why in [
        (signer.token("a1", ttl_s=-120), "expired"),
        (forged, "invalid ID token"),
        (signer.token("a1", audience="someone-else"), "another audience"),
        (signer.token("ghost"), "not in the directory"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            access.Search(
                apb.SearchRequest(purpose=apb.PURPOSE_VERIFICATION),
                metadata=[("authorization", f"Bearer {token}")],
            )
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert why in (err.value.details() or "")
    # Each refusal is audited (repeats from one source may be summed into one entry).
    refused = web.world.events_after(seq)
    assert refused and all(e["outcome"] == "unauthenticated" for e in refused)
    assert refused[0]["detail"].startswith("channel=web")


def test_another_persons_recording_and_csrf(web: WebWorld, calls: Calls, browser: Any) -> None:
    page = sign_in(browser, web, "a1")
    cookie = session_cookie(page)
    seq = web.world.head_seq()
    status, _, body = web.get(f"/recordings/{calls.mikko}", cookie)
    assert status == 403 and b"Tallennetta ei l" in body
    denied = web.world.events_after(seq)
    assert [(e["actor"], e["recording_id"], e["outcome"]) for e in denied] == [
        ("person:a1", calls.mikko, "denied")
    ]
    seq = web.world.head_seq()
    assert web.get("/recordings/..%2F..%2Fetc", cookie)[0] == 404
    assert web.get("/recordings/" + "A" * 32, cookie)[0] == 404
    status, _, body = web.get("/search?since=32.13.2026&customer=0401234567", cookie)
    assert status == 400 and b'name="since" value="32.13.2026"' in body
    assert b"0401234567" not in body, "a wrong customer field is not shown back"
    assert web.world.events_after(seq) == [], "nothing reached the store"
    status, headers, _ = web.get("/search", cookie)
    csp = headers["content-security-policy"]
    assert status == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp
    # A state change without the session's CSRF token changes nothing.
    status = page.evaluate(
        f"fetch('/recordings/{calls.aino[0]}/purpose', {{method: 'POST',"
        " body: new URLSearchParams({purpose: 'verification'})}).then(r => r.status)"
    )
    assert status == 403
    assert web.get(f"/recordings/{calls.aino[0]}/audio", cookie)[0] == 409, "no purpose chosen"
    page.context.close()


def test_range_requests(web: WebWorld, calls: Calls, browser: Any) -> None:
    page = sign_in(browser, web, "a1")
    page.goto(f"{web.url}/recordings/{calls.aino[0]}")
    page.select_option("#purpose", "verification")
    page.click("#start")
    cookie = session_cookie(page)
    audio, path = opus_audio(), f"/recordings/{calls.aino[0]}/audio"
    size = len(audio)

    def fetch(spec: str) -> tuple[int, dict[str, str], bytes]:
        return web.get(path, cookie, range=spec)

    cases = {
        "bytes=0-99": (206, 0, 99),
        f"bytes=50-{size * 10}": (206, 50, size - 1),  # past the end: clipped
        "bytes=0-10,5-20": (206, 0, 20),  # overlapping: merged
        "bytes=-100": (206, size - 100, size - 1),
        f"bytes={size - 1}-": (206, size - 1, size - 1),
    }
    for spec, (code, first, last) in cases.items():
        status, headers, body = fetch(spec)
        assert status == code, spec
        assert headers["content-range"] == f"bytes {first}-{last}/{size}", spec
        assert body == audio[first : last + 1], spec
        assert headers["cache-control"] == "no-store"
    for spec in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=0-10,100-200",
                 "bytes=abc", "items=0-1", "bytes=9-3"):  # fmt: skip
        status, headers, body = fetch(spec)
        assert status == 416 and body == b"", spec
    assert fetch(f"bytes={size}-")[1]["content-range"] == f"bytes */{size}"
    # A restricted call: its metadata shows, marked; its audio is refused, and said so.
    restricted = seed_audio(web.world, AINO, opus_audio(), day_ms(9), restricted=True)
    page.goto(f"{web.url}/recordings/{restricted}")
    assert "Käsittely rajoitettu" in page.inner_text("dl.facts")
    page.select_option("#purpose", "verification")
    page.click("#start")
    page.wait_for_selector("#audio-error", state="visible")
    assert web.get(f"/recordings/{restricted}/audio", cookie, range="bytes=0-9")[0] == 403
    shot(page, "recording-restricted")
    page.context.close()


def test_privacy_officer_runs_a_request_from_number_to_erasure(
    web: WebWorld, calls: Calls, browser: Any
) -> None:
    import io
    import zipfile

    started = (day_ms(2.5) // 60_000) * 60_000
    rid = seed_audio(web.world, MIKKO, opus_audio(), started)
    local = dt.datetime.fromtimestamp(started / 1000, ZoneInfo("Europe/Helsinki"))
    seq = web.world.head_seq()
    page = sign_in(browser, web, "po")
    page.click("nav.main a[href='/cases']")
    page.fill("input[name=case]", "DSR-2026-0042")
    page.fill("input[name=number]", "not a number 12")
    page.fill("input[name=at]", f"{local:%d.%m.%Y %H:%M}")
    page.click("#find")
    assert "number" in page.inner_text("p.error") and page.locator("input[name=id]").count() == 0
    page.fill("input[name=number]", "040-123 4567")
    page.fill("input[name=at]", f"{local:%d.%m.%Y %H:%M}")
    page.click("#find")
    assert page.url.endswith("/cases/find") and "4567" not in page.url
    assert page.locator("input[name=id]").evaluate_all("e => e.map(x => x.value)") == [rid]
    assert "4567" not in page.content(), "the number typed is not shown back"
    shot(page, "case-found")

    def act(action: str) -> None:
        page.click(f"button[name=action][value={action}]")
        page.wait_for_load_state("networkidle")

    act("hold")
    assert "Lakisääteinen säilytys" in page.inner_text("table.results")
    act("restrict")
    assert "Käsittely rajoitettu" in page.inner_text("table.results")
    act("unseal")
    assert page.inner_text("#unsealed") == "+358401234567"
    with page.expect_download() as download:
        page.click("button[name=action][value=export]")
    package = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert sorted(package.namelist()) == sorted(
        ["metadata.json", f"{rid}.ogg", "LUE-MINUT_README.txt"]
    )
    assert package.read(f"{rid}.ogg") == opus_audio()
    assert f"{local:%d.%m.%Y %H:%M}" in package.read("LUE-MINUT_README.txt").decode()
    act("erase")  # held: the confirmation page names the call, the store then refuses
    shot(page, "case-erase-confirm")
    assert f"{local:%d.%m.%Y %H:%M}" in page.inner_text("ul.destroy")
    page.click("#erase-yes")
    assert "Pura säilytys ensin" in page.inner_text("main")
    assert web.world.storage.catalog.get(rid) is not None, "on hold: not erased"
    page.goto(web.url + "/cases")
    page.fill("input[name=case]", "DSR-2026-0042")
    page.fill("input[name=number]", "+358401234567")
    page.fill("input[name=at]", f"{local:%d.%m.%Y %H:%M}")
    page.click("#find")
    act("release")
    act("erase")
    page.click("#erase-yes")
    assert "Tehty" in page.inner_text("main")
    row = web.world.storage.catalog.get(rid)
    assert row is None or row.destroy_reason == "erasure"
    steps = [
        (e["action"], e["outcome"]) for e in web.world.events_after(seq)
        if e["actor"] == "person:po" and e["reason"] == "DSR-2026-0042"
        and e["action"] != "get"
    ]  # fmt: skip
    assert steps == [
        ("find_by_number", "refused"),  # "not a number 12": the store said so, audited
        ("find_by_number", "allowed"), ("hold", "allowed"), ("restrict", "allowed"),
        ("unseal", "allowed"), ("export_package", "allowed"), ("erase", "refused"),
        ("find_by_number", "allowed"), ("release", "allowed"), ("erase", "allowed"),
    ]  # fmt: skip
    # The audit view shows every step of the case, and the chain is intact.
    page.goto(f"{web.url}/audit?recording={rid}&verify=1")
    shown = page.locator("table.audit tbody tr td:nth-child(5)").all_inner_texts()
    channels = page.locator("table.audit tbody tr td:nth-child(4)").all_inner_texts()
    assert "web" in channels and set(channels) <= {"web", ""}
    for action in ("find_by_number", "hold", "restrict", "unseal", "export_package", "erase"):
        assert action in shown, action
    assert page.inner_text("#verified") == "Ketju ehjä"
    shot(page, "audit")
    with page.expect_download() as download:
        page.click("a[href^='/audit.csv']")
    exported = Path(download.value.path()).read_text()
    assert exported.startswith("seq,at,actor,action") and "DSR-2026-0042" in exported
    for log in (web.web_log, web.world.root / "provider.log"):
        text = log.read_text()
        assert "1234567" not in text and "123 4567" not in text, log
    page.context.close()


def test_audit_log_is_not_for_agents_or_supervisors(web: WebWorld, browser: Any) -> None:
    page = sign_in(browser, web, "s1", locale="en-GB")
    assert page.locator("nav.main a[href='/audit']").count() == 0
    page.goto(web.url + "/audit")
    assert "for the privacy officer and the administrators" in page.inner_text("main")
    page.context.close()
    for person, purpose in (("a1", apb.PURPOSE_LEGAL), ("s1", apb.PURPOSE_SECURITY),
                            ("ad", apb.PURPOSE_LEGAL)):  # fmt: skip
        token = web.signer.token(person)
        with pytest.raises(grpc.RpcError) as err:
            web.world.access.AuditLog(
                apb.AuditRequest(purpose=purpose),
                metadata=[("authorization", f"Bearer {token}")],
            )
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, person
    page = sign_in(browser, web, "ad", locale="en-GB")
    assert "All calls" in page.inner_text("h1")
    page.click("nav.main a[href='/audit']")
    assert page.locator("table.audit tbody tr").count() > 0
    page.context.close()
    allowed = web.world.access.AuditLog(
        apb.AuditRequest(purpose=apb.PURPOSE_SECURITY, limit=3),
        metadata=[("authorization", f"Bearer {web.signer.token('ad')}")],
    )
    assert len(allowed.entries) == 3 and allowed.truncated and allowed.head_seq > 3


@pytest.mark.slow
def test_demo_serves_the_web_with_local_sign_in(tmp_path: Path, browser: Any) -> None:
    import signal
    import subprocess
    import sys

    demo = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "demo", "--dir", str(tmp_path / "demo"),
         "--seconds", "3", "--web"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        url = ""
        for line in demo.stdout:
            if found := re.search(r"the people's web: (https://127\.0\.0\.1:\d+/)", line):
                url = found.group(1)
                break
        assert url, "the demo prints the web's URL"
        context = browser.new_context(ignore_https_errors=True, locale="en-GB")
        page = context.new_page()
        page.goto(url)
        page.click("a.button")
        page.click("button:has-text('e1001')")
        page.locator("table.results tbody tr").first.wait_for()  # the click may return first
        assert employees_shown(page) == ["Aino Virtanen"]
        page.click("table.results a")
        page.select_option("#purpose", "verification")
        page.click("#start")
        page.wait_for_function("() => document.getElementById('audio')?.readyState >= 1")
        context.close()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
        if demo.stdout is not None:
            demo.stdout.close()


def test_listening_to_one_side_routes_that_channel_to_both_ears(
    web: WebWorld, calls: Calls, browser: Any
) -> None:
    from tests.support.web import left_only

    call = seed_audio(web.world, AINO, left_only(30), day_ms(12), 30)
    page = sign_in(browser, web, "a1")
    page.goto(f"{web.url}/recordings/{call}")
    page.select_option("#purpose", "verification")
    page.click("#start")
    page.wait_for_function("() => document.getElementById('audio')?.readyState >= 1")
    page.evaluate("document.getElementById('audio').play()")

    def heard(solo: str) -> tuple[float, float]:
        page.check(f"input[name=solo][value={solo}]")
        page.wait_for_timeout(600)
        left, right = page.evaluate("document.body.dataset.heard").split(",")
        return float(left), float(right)

    both, customer, employee = heard("both"), heard("customer"), heard("employee")
    assert both[0] > 0.05 and both[1] < 0.01, f"as recorded: customer left only {both}"
    assert customer[0] > 0.05 and customer[1] > 0.05, f"customer in both ears {customer}"
    assert employee[0] < 0.01 and employee[1] < 0.01, f"the employee was silent {employee}"
    page.context.close()


def test_skip_silence_speeds_through_the_quiet_part(
    web: WebWorld, calls: Calls, browser: Any
) -> None:
    from tests.support.web import left_only

    call = seed_audio(web.world, AINO, left_only(30, 3, 24), day_ms(13), 30)
    page = sign_in(browser, web, "a1")
    page.goto(f"{web.url}/recordings/{call}")
    page.select_option("#purpose", "verification")
    page.click("#start")
    page.check("#skip-silence")
    page.wait_for_function("() => document.getElementById('audio')?.readyState >= 1")
    page.evaluate("document.getElementById('audio').play()")
    page.wait_for_function(
        "() => { const a = document.getElementById('audio');"
        " return a.currentTime > 4 && a.playbackRate === 3; }",
        timeout=15_000,
    )
    page.wait_for_function(
        "() => { const a = document.getElementById('audio');"
        " return a.currentTime > 24.5 && a.playbackRate === 1; }",
        timeout=20_000,
    )
    page.context.close()


def test_the_configured_claim_names_the_person(web: WebWorld) -> None:
    """[store.oidc] person_claim: e.g. Entra ID's employee id instead of `sub`; keys
    from the real provider's discovery document and JWKS (over HTTPS, its CA)."""
    from agent.config import StoreOidcConfig
    from agent.store.access.identity import OidcVerifier

    verifier = OidcVerifier(
        StoreOidcConfig(web.issuer, ("callrec-web",), "employeeid", ca_file=web.ca_file)
    )
    signer = web.signer
    assert verifier.verify(signer.token("opaque-oid-1", employeeid="a2")).person_id == "a2"
    assert verifier.verify(signer.token("opaque-oid-1")).problem == (
        "ID token has no 'employeeid' claim"
    )
    assert verifier.verify(signer.token("x", ttl_s=-120, employeeid="a2")).problem == (
        "expired ID token"
    )
    unknown_kid = jwt.encode(
        {"iss": signer.issuer, "sub": "x", "aud": "callrec-web", "iat": 0, "exp": 2**31},
        signer.key, "RS256", headers={"kid": "not-published"},
    )  # fmt: skip
    assert verifier.verify(unknown_kid).problem == (
        "ID token signed with a key the issuer does not publish"
    )


def test_personal_tokens_still_work_beside_oidc(web: WebWorld) -> None:
    """With [store.oidc] set, a CLI's personal token (three dot-separated parts too) is
    still checked as a personal token, and audited as channel=cli."""
    token = web.world.issue("s1")
    seq = web.world.head_seq()
    found = web.world.access.Search(
        apb.SearchRequest(purpose=apb.PURPOSE_VERIFICATION),
        metadata=[("authorization", f"Bearer {token}")],
    )
    assert found is not None
    # (The store's summary of earlier tests' forged tokens may land here too: not ours.)
    (event,) = [e for e in web.world.events_after(seq) if e["action"] == "search"]
    assert event["actor"] == "person:s1" and event["detail"].startswith("channel=cli")
