"""Benchmark: the people's web, measured from a client on loopback against the real
`callrec web` process, the real store (SQLite catalog) and a real OpenID provider.

A catalog of ``--calls`` recordings of one agent plus one ``--minutes``-long
recording; the agent signs in once with Chromium (the real sign-in), then plain HTTPS
requests with that session time:

* the search page (first page; and with a period filter), server time as the client
  sees it on loopback: time to the whole response;
* the first audio byte of the long recording (``Range: bytes=0-``);
* a seek to the middle (``Range: bytes=<size/2>-``): time to the first byte;
* the long recording's waveform: the first request, its page never opened (the store
  decodes the hour), and the next ones (its cache);
* the web process's RSS idle and while ``--listeners`` clients each stream the long
  recording by ranges for ``--listen-seconds``.

    .venv/bin/python -m tests.bench.web [--calls 2000] [--minutes 60] [--listeners 50]
"""

from __future__ import annotations

import argparse
import re
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.bench.common import emit, percentile
from tests.support.access_world import opus_audio
from tests.support.web import WebWorld, day_ms, long_opus, running_web, seed_audio

MODULE = "tests.bench.web"
AINO: list[tuple[str, str, str | None]] = [("a1", "Aino Agent", "parcels")]


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+)", status)
    return round(int(found.group(1)) / 1024, 1) if found else 0.0


def session(web: WebWorld) -> str:
    """Sign in as a1 with Chromium; the session cookie."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_context(ignore_https_errors=True).new_page()
        page.goto(web.url + "/signin")
        page.fill("#login", "a1")
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r".*/search"))
        cookie = next(c for c in page.context.cookies() if c["name"] == "__Host-callrec")
        browser.close()
    return f"__Host-callrec={cookie['value']}"


class Client:
    def __init__(self, web: WebWorld, cookie: str) -> None:
        self.url, self.cookie = web.url, cookie
        self.ctx = ssl.create_default_context(cafile=str(web.ca_file))

    def timed(self, path: str, first_byte: bool = False, **headers: str) -> float:
        request = urllib.request.Request(
            self.url + path, headers={"cookie": self.cookie, **headers}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, context=self.ctx, timeout=30) as response:
            if first_byte:
                assert response.read(1)
                elapsed = time.perf_counter() - started
                response.read()
                return elapsed
            response.read()
            assert response.status in (200, 206), response.status
        return time.perf_counter() - started

    def post(self, path: str, data: dict[str, str]) -> None:
        """A form POST; its redirect is not followed (the recording's page would start
        the store's waveform ahead, and the bench times it cold)."""
        body = urllib.parse.urlencode(data).encode()
        request = urllib.request.Request(self.url + path, body, headers={"cookie": self.cookie})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.ctx), NoRedirect
        )
        try:
            opener.open(request, timeout=30).close()
        except urllib.error.HTTPError as err:
            assert err.code == 303, err.code


def csrf(client: Client) -> str:
    request = urllib.request.Request(client.url + "/search", headers={"cookie": client.cookie})
    with urllib.request.urlopen(request, context=client.ctx, timeout=30) as response:
        found = re.search(r'name="csrf" value="([^"]+)"', response.read().decode())
    assert found
    return found.group(1)


def stats(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1)}  # fmt: skip


def listeners(client: Client, path: str, size: int, count: int, seconds: float) -> int:
    stop, served = time.monotonic() + seconds, [0]
    lock = threading.Lock()

    def listen(n: int) -> None:
        offset = (n * 65_536) % size
        while time.monotonic() < stop:
            client.timed(path, range=f"bytes={offset}-{offset + 65_535}")
            offset = (offset + 65_536) % max(1, size - 65_536)
            with lock:
                served[0] += 1
            time.sleep(0.25)  # a listener needs ~2 KB/s; this asks far more often

    threads = [threading.Thread(target=listen, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served[0]


def peak_rss(pid: int, work: Any) -> tuple[Any, float]:
    """Run ``work()`` while sampling the process's RSS; its result and the peak."""
    peak, stop = [rss_mib(pid)], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return work(), peak[0]
    finally:
        stop.set()
        sampler.join()


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    for web in running_web(root):
        return measure(web, args)
    raise AssertionError("unreachable")


def measure(web: WebWorld, args: argparse.Namespace) -> dict[str, Any]:
    short = opus_audio()
    for i in range(args.calls):
        seed_audio(web.world, AINO, short, day_ms(1 + i * 30 / args.calls))
    long_audio = long_opus(args.minutes * 60)
    long = seed_audio(web.world, AINO, long_audio, day_ms(0.5), args.minutes * 60)
    client = Client(web, session(web))
    client.post(f"/recordings/{long}/purpose", {"csrf": csrf(client), "purpose": "verification"})
    rss_idle = rss_mib(web.web_pid)
    audio, size = f"/recordings/{long}/audio", len(long_audio)
    result: dict[str, Any] = {
        "calls": args.calls + 1, "long_minutes": args.minutes, "long_bytes": size,
        "search": stats([client.timed("/search") for _ in range(args.requests)]),
        "search_period": stats([client.timed("/search?since=01.01.2020&until=31.12.2099")
                                for _ in range(args.requests)]),
        "first_byte": stats([client.timed(audio, True, range="bytes=0-")
                             for _ in range(args.requests)]),
        "seek_middle": stats([client.timed(audio, True, range=f"bytes={size // 2}-")
                              for _ in range(args.requests)]),
        "rss_idle_mib": rss_idle,
    }  # fmt: skip
    if args.waveform:
        wave = f"/recordings/{long}/waveform"
        result["waveform_cold_ms"] = round(client.timed(wave) * 1000)
        result["waveform_cached"] = stats([client.timed(wave) for _ in range(20)])
    served, peak = peak_rss(
        web.web_pid,
        lambda: listeners(client, audio, size, args.listeners, args.listen_seconds),
    )
    result.update(listeners=args.listeners, ranges_served=served, rss_peak_mib=peak)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--listeners", type=int, default=50)
    parser.add_argument("--listen-seconds", type=float, default=10.0)
    parser.add_argument(
        "--no-waveform",
        dest="waveform",
        action="store_false",
        help="skip the waveform (a store without the Waveform call)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="web-bench-") as tmp:
        result = run(args, Path(tmp))
    rows = [[k, v] for k, v in result.items()]
    emit("people's web", MODULE, {"The people's web": (["metric", "value"], rows)}, result,
         started=started)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
