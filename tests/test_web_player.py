"""The player in a real Chromium: the whole waveform drawn before anything plays (from
the store's small waveform answer, not the audio), and a one-hour recording seeking to
45:00 by HTTP ranges, not by downloading the file. Real `callrec web`, store and
OpenID provider."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.web.audio import MAX_PART
from tests.support.web import (
    WebWorld,
    day_ms,
    launch_chromium,
    left_only,
    long_opus,
    running_web,
    seed_audio,
)
from tests.test_web import pytestmark as web_mark
from tests.test_web import shot, sign_in

pytestmark = web_mark
AINO: list[tuple[str, str, str | None]] = [("a1", "Aino Agent", "parcels")]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebWorld]:
    yield from running_web(tmp_path_factory.mktemp("web-player"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from launch_chromium()


def _open_player(browser: Any, web: WebWorld, rid: str, size: int = 1366) -> Any:
    page = sign_in(browser, web, "a1")
    page.set_viewport_size({"width": size, "height": 768 if size == 1366 else 1080})
    page.goto(f"{web.url}/recordings/{rid}")
    page.select_option("#purpose", "verification")
    page.click("#start")
    return page


def _audio_ranges(page: Any) -> list[tuple[int, int, int]]:
    """(status, first byte, last byte) of each audio response the page receives."""
    seen: list[tuple[int, int, int]] = []

    def note(response: Any) -> None:
        if response.url.endswith("/audio"):
            spec = response.headers.get("content-range", "bytes 0-0/0").split()[1]
            first, last = spec.split("/")[0].split("-")
            seen.append((response.status, int(first), int(last)))

    page.on("response", note)
    return seen


LANE_PIXELS = """([from, to]) => {
  const c = document.getElementById('wave');
  const data = c.getContext('2d').getImageData(from, 0, to - from, c.height / 2).data;
  let ink = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 120 && data[i] < 80) ink++;
  return ink;
}"""


def test_the_whole_waveform_is_drawn_before_anything_plays(web: WebWorld, browser: Any) -> None:
    # A minute: the customer speaks (a tone, left) except from 0:20 to 0:40; the
    # employee (right) is silent throughout.
    audio = left_only(60, 20, 40)
    rid = seed_audio(web.world, AINO, audio, day_ms(1), 60)
    seq = web.world.head_seq()
    page = _open_player(browser, web, rid)
    page.wait_for_function("() => document.body.dataset.waveform === 'loaded'", timeout=60_000)
    wave = page.evaluate("fetch(location.pathname + '/waveform').then((r) => r.json())")
    assert wave["duration_ms"] == pytest.approx(60_000, abs=500)
    left, right, n = wave["left"], wave["right"], len(wave["left"])
    assert n == len(right) >= 600
    talking = left[: n * 18 // 60] + left[n * 42 // 60 :]
    assert min(talking) > 60, "the customer's tone, at its level, before and after the pause"
    assert max(left[n * 22 // 60 : n * 38 // 60]) < 5, "the quiet middle"
    assert max(right) < 5, "the employee said nothing"
    # Drawn up front: the customer's lane has ink at the very end, nothing has played.
    assert page.evaluate("document.getElementById('audio').paused")
    assert page.evaluate("document.getElementById('audio').currentTime") == 0
    width = page.evaluate("document.getElementById('wave').width")
    assert page.evaluate(LANE_PIXELS, [width - 40, width - 2]) > 20
    assert page.evaluate(LANE_PIXELS, [width // 2 - 10, width // 2 + 10]) < 20 * 3
    shot(page, "recording-waveform")
    waves = [e for e in web.world.events_after(seq) if e["detail"].endswith("waveform")]
    assert waves and all(
        e["action"] == "play" and e["actor"] == "person:a1" and e["outcome"] == "allowed"
        for e in waves
    )
    # A click on the waveform seeks there (three quarters in: 0:45).
    box = page.locator("#wave").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
    page.wait_for_function("() => { const a = document.getElementById('audio');"
                           " return !a.seeking && Math.abs(a.currentTime - 45) < 1; }")  # fmt: skip
    page.context.close()


def test_the_waveform_needs_a_purpose_and_the_right_person(web: WebWorld, browser: Any) -> None:
    rid = seed_audio(web.world, AINO, left_only(10), day_ms(2), 10)
    mikko = seed_audio(web.world, [("a2", "Mikko Agent", "telesales")], left_only(10), day_ms(2))
    page = sign_in(browser, web, "a1")
    cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-callrec")
    jar = f"__Host-callrec={cookie['value']}"
    status, headers, _ = web.get(f"/recordings/{rid}/waveform", jar)
    assert status == 409 and headers["cache-control"] == "no-store", "no purpose chosen yet"
    # A purpose stated for another agent's call (by hand: the page offers no form): the
    # store refuses the waveform as it refuses the audio, and audits the refusal.
    csrf = page.get_attribute("input[name=csrf]", "value")
    seq = web.world.head_seq()
    page.request.post(f"{web.url}/recordings/{mikko}/purpose",
                      form={"csrf": csrf, "purpose": "verification"}, max_redirects=0)  # fmt: skip
    assert web.get(f"/recordings/{mikko}/waveform", jar)[0] == 403
    refused = [e for e in web.world.events_after(seq) if e["recording_id"] == mikko]
    assert refused and all(e["outcome"] == "denied" for e in refused)
    page.context.close()


def test_a_long_recording_s_waveform_is_ready_when_the_purpose_is_chosen(
    web: WebWorld, browser: Any
) -> None:
    """Opening a long recording's page starts its waveform in the store (nothing is
    served or audited as a play until the player asks for it)."""
    rid = seed_audio(web.world, AINO, long_opus(300), day_ms(4), 300)
    cache = web.world.access_service.waveforms._cache
    seq = web.world.head_seq()
    page = sign_in(browser, web, "a1")
    page.goto(f"{web.url}/recordings/{rid}")
    deadline = time.monotonic() + 60
    while rid not in cache and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rid in cache, "computed while the person chooses a purpose"
    assert [e["action"] for e in web.world.events_after(seq) if e["recording_id"] == rid] == [
        "get"
    ], "the page was audited; nothing was played"
    page.select_option("#purpose", "verification")
    page.click("#start")
    page.wait_for_function("() => document.body.dataset.waveform === 'loaded'", timeout=10_000)
    page.context.close()


@pytest.mark.slow
def test_an_hour_long_recording_seeks_to_45_minutes_by_ranges(web: WebWorld, browser: Any) -> None:
    hour = long_opus(3600)
    rid = seed_audio(web.world, AINO, hour, day_ms(3), 3600)
    page = _open_player(browser, web, rid, size=1920)
    ranges = _audio_ranges(page)
    page.wait_for_function("() => document.getElementById('audio')?.readyState >= 1")
    assert page.evaluate("document.getElementById('audio').duration") == pytest.approx(3600, abs=2)
    seek_ms = page.evaluate(
        """() => new Promise((resolve) => {
          const a = document.getElementById('audio'), t0 = performance.now();
          a.addEventListener('seeked', () => resolve(performance.now() - t0), { once: true });
          a.currentTime = 2700;
        })"""
    )
    page.evaluate("document.getElementById('audio').play()")
    page.wait_for_function(
        "() => document.getElementById('audio').currentTime >= 2700.5", timeout=30_000
    )
    now = page.evaluate("document.getElementById('audio').currentTime")
    assert 2700 <= now < 2720, f"plays from 45:00, at {now}"
    page.evaluate("document.getElementById('audio').pause()")
    # What the seek and the first seconds of play fetched: read before the waveform's
    # wait, while which a paused player may go on buffering (more on a busy host).
    at_play = list(ranges)
    page.wait_for_function("() => document.body.dataset.waveform === 'loaded'", timeout=120_000)
    shot(page, "recording-hour-1920")
    assert ranges and all(status == 206 for status, _, _ in ranges), ranges
    # Each answer is at most MAX_PART (1 MiB): the head, Ogg's last page (the duration),
    # the seek and Chromium's read-ahead come to at most four of them (3.87 MB seen), far
    # from the 10.8 MB file (its first 45 minutes are 8.1 MB).
    fetched = sum(last - first + 1 for _, first, last in at_play)
    assert fetched <= 4 * MAX_PART < len(hour) * 0.4, (
        f"ranges, not the file: {fetched} of {len(hour)} bytes in {at_play}"
    )
    assert max(first for _, first, _ in ranges) > len(hour) * 0.6, "asked for the 45th minute"
    print(f"seek to 45:00 in a one-hour recording: {seek_ms:.0f} ms, {fetched} bytes fetched")
    assert seek_ms < 5_000
    page.context.close()
