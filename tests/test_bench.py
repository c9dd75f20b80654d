"""The benchmark scripts themselves, at a size CI can afford: each runs as the README
says, ends with one JSON line naming the machine, versions and command, and its
figures say the work was really done (every call stored, every expired row destroyed,
every byte uploaded). The figures quoted in the README come from the default sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.support.daemons import REPO

pytestmark = [pytest.mark.slow, pytest.mark.alone]


def bench(module: str, *args: str, timeout: float = 240.0) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", f"tests.bench.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["command"] == " ".join([f".venv/bin/python -m tests.bench.{module}", *args])
    assert report["machine"]["cores"] >= 1 and report["versions"]["callrec"]
    return report


def test_concurrent_recording_stores_every_call_and_times_it() -> None:
    report = bench("concurrent", "--steps", "4", "--seconds", "6", "--spread", "4", "--rate", "10")
    (step,) = report["result"]["steps"]
    assert step["calls"] == 4 and step["whole"] == 4 and step["streams"] == 8
    assert step["rx_over_sent"] > 0.95
    assert 0 < step["hangup_to_safe_p50_s"] <= step["hangup_to_safe_p99_s"] < 60
    assert step["usage"]["busy"]["workers"]["processes"] == step["workers"]
    # The compiled sender (the default) sent the calls' RTP and said how late it ran.
    assert step["sender"] == "c" and step["usage"]["busy"]["sender"]["processes"] == 1
    assert step["sender_packets"] >= step["packets_received"] > 0
    assert 0 <= step["sender_late_p50_s"] <= step["sender_late_p99_s"] <= step["sender_max_late_s"]


def test_concurrent_live_path_streams_every_call() -> None:
    """``--path live``: the calls stream while they run; the wire carries them in A-law."""
    report = bench("concurrent", "--steps", "4", "--seconds", "6", "--rate", "10", "--path", "live")
    (step,) = report["result"]["steps"]
    assert step["path"] == "live" and step["whole"] == 4
    # Two legs of G.711 A-law at 8 kHz: 937.5 KiB a minute, plus framing (PCM: 1875).
    assert 930 <= step["wire_kb_per_call_minute"] < 1100
    assert 0 < step["hangup_to_safe_p99_s"] <= step["hangup_to_archived_p99_s"] < 60
    assert step["agent_cpu_s_per_call_minute"] > 0 and step["store_cpu_s_per_call_minute"] > 0


def test_live_burst_finishes_every_hung_up_call() -> None:
    """The live uplink and a store alone: every capture grew in real time, streamed,
    hung up and was finished at the store."""
    report = bench("live_burst", "--calls", "20", "--seconds", "3", "--rate", "20")
    result = report["result"]
    assert result["calls"] == result["safe"] == 20
    # Each call's two legs grew 8000 samples a second for at least the 3 s it was up
    # (after a first second), one byte each on the wire (A-law; PCM would be >= 2.56 MB).
    assert 20 * 2 * 8_000 * 3 <= result["bytes_sent"] <= 20 * 2 * 8_000 * 6
    assert 0 < result["hangup_to_safe_p50_s"] <= result["hangup_to_safe_p99_s"] < 30
    assert result["store_cpu_s_per_call_minute"] > 0


def test_store_scale_destroys_exactly_the_expired_on_both_backends() -> None:
    report = bench(
        "store_scale", "--rows", "4000", "--small-rows", "2000", "--expired", "500",
        "--lookups", "20", "--searches", "10", "--blob-files",
    )  # fmt: skip
    backends = report["result"]["backends"]
    assert set(backends) == {"sqlite", "postgresql"}
    for figures in backends.values():
        assert 0 < figures["dsr_ms"]["n"] <= 20  # each lookup found its call (or it fails)
        for size in ("4000", "2000"):
            sweep = figures["sweep"][size]
            assert sweep["destroyed"] == 500 and sweep["failed"] == 0
            assert sweep["remaining"] == int(size) - 500 and sweep["audit_ok"]
            assert sweep["blob_files_left"] == 0


def test_upload_reaches_the_store_over_tls_and_compares_with_a_socket() -> None:
    report = bench("upload", "--mib", "8", "--repeats", "1")
    result = report["result"]
    assert result["tls"] and result["size_bytes"] == 8 * 1024 * 1024
    assert result["median"]["grpc_MB/s"] > 0 and result["median"]["grpc/tcp"] > 0


def test_finalize_cost_is_measured_per_audio_hour() -> None:
    report = bench("finalize_cost", "--calls", "1", "--minutes", "0.25", "--repeats", "1")
    median = report["result"]["median"]
    assert set(median) == {"opus", "flac", "wav"}
    assert median["opus"]["cpu_h"] > median["wav"]["ffmpeg_h"] == 0
    assert 10 < median["opus"]["kbit_s"] < 40


def test_spool_burst_takes_every_recording() -> None:
    report = bench("spool_burst", "--files", "30", "--seconds", "1")
    result = report["result"]
    assert result["recordings"] == 30 and result["quarantined"] == 0


def test_rtp_sender_is_cheap_on_time_and_delivers_everything() -> None:
    report = bench("rtp_sender", "--calls", "20", "--sender", "c,python", "--seconds", "3")
    results = report["result"]["results"]
    assert [(r["sender"], r["calls"]) for r in results] == [("c", 20), ("python", 20)]
    for r in results:
        assert r["sent"] >= 2 * 20 * 50 * 3 and r["received"] == r["sent"]
        assert 0 < r["cpu_pct"] < 100
        assert 0 <= r["late_p50_ms"] <= r["late_p99_ms"] <= r["late_max_ms"]


def test_web_times_search_first_byte_and_seek() -> None:
    from tests.support.web import CHROMIUM, node_ready

    if not (CHROMIUM.exists() and node_ready()):
        pytest.skip("needs chromium and tests/oidc (.ci/setup)")
    report = bench("web", "--calls", "20", "--minutes", "6", "--requests", "10",
                   "--listeners", "3", "--listen-seconds", "2")  # fmt: skip
    result = report["result"]
    assert result["calls"] == 21 and result["long_bytes"] > 1_048_576
    for name in ("search", "search_period", "first_byte", "seek_middle"):
        assert result[name]["n"] == 10 and 0 < result[name]["p50_ms"] <= result[name]["p99_ms"]
    assert result["ranges_served"] >= 3 and result["rss_peak_mib"] >= result["rss_idle_mib"] > 0
    assert result["waveform_cold_ms"] > 0 and result["waveform_cached"]["n"] == 20


def test_replicas_bench_uploads_through_the_balancer_and_sweeps() -> None:
    """One replica count and one sweeper count (the README's figures: 1,2,3 and 1,3)."""
    report = bench(
        "replicas", "--replicas", "2", "--recordings", "20", "--paced", "4",
        "--expired", "30", "--sweepers", "2", timeout=300,
    )  # fmt: skip
    uploads, sweeps = report["result"]["uploads"], report["result"]["sweeps"]
    assert [u["replicas"] for u in uploads] == [2]
    for u in uploads:
        assert u["per_s"] > 0 and 0 < u["hangup_to_safe_p50_s"] <= u["hangup_to_safe_p95_s"]
    assert [s["sweepers"] for s in sweeps] == [2]
    assert all(s["per_s"] > 0 and 1 <= s["actors"] <= s["sweepers"] for s in sweeps)


def test_worker_idle_compares_exec_and_fork_workers() -> None:
    """Forked workers share the zygote's heap: each holds far fewer private pages."""
    report = bench("worker_idle", "--workers", "3", "--seconds", "3", "--settle", "1")
    ways = report["result"]["ways"]
    assert ways["exec"]["processes"] == ways["fork"]["processes"] == 3
    assert ways["exec"]["zygote_pss_mb"] == 0 < ways["fork"]["zygote_pss_mb"]
    assert ways["fork"]["uss_mb"] < ways["exec"]["uss_mb"] / 2
    assert 0 < ways["fork"]["cpu_pct"] < 5 and ways["fork"]["wakeups_per_s"]["media"] > 0


def test_control_latency_pauses_a_live_call_and_finds_each_silence() -> None:
    report = bench("control_latency", "--calls", "1", "--seconds", "10", "--every", "3")
    result = report["result"]
    assert result["pauses"] == 2  # at 2 s and 5 s of a 10 s call, each found silent
    assert result["api_round_trip_ms"]["max"] > 0
