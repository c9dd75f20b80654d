"""The compiled RTP load sender (agent/testcall/rtpsend.c): built from source on first
use, fed by the same FIFO protocol as the Python sender, sends every packet of a WAV as
G.711 A-law with consecutive sequence numbers and timestamps at a 20 ms pace, and
reports its lateness."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.testcall.rtp import StreamSpec, encode_wav
from agent.testcall.rtpsend import CompiledSender, build
from agent.testcall.scenario import rtp_command
from agent.testcall.sipp import free_port
from tests.support.audio import make_speech, trim
from tests.support.daemons import REPO
from tests.test_rtp import check_stream, receive


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rtpsend")
    return trim(make_speech(directory).customer, directory / "short.wav", 1.0)


def test_sender_delivers_the_file_paced_with_consecutive_headers(wav: Path, tmp_path: Path) -> None:
    payloads = encode_wav(wav)
    sender = CompiledSender(tmp_path / "rtp.fifo", build(tmp_path / "cache"))
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for sink in sinks:
            sink.bind(("127.0.0.1", 0))
        src = free_port()
        specs = [
            StreamSpec("127.0.0.1", sinks[0].getsockname()[1], wav).format(),
            StreamSpec("127.0.0.1", sinks[1].getsockname()[1], wav, src).format(),
        ]
        # A spec the sender must refuse, then one call as SIPp's exec hands it over
        # (read at once: arrival times are the pace).
        for line in (["127.0.0.1:1=/nonexistent.wav"], specs):
            command = rtp_command(line, sender.fifo, None)
            subprocess.run(["sh", "-c", command], check=True, stdout=subprocess.DEVNULL)
        received = receive(sinks, len(payloads))
        assert sender.lateness().packets == 2 * len(payloads)  # up to date on request
        assert sender.wait_idle(5, streams=3)
        late = sender.stop()
    finally:
        sender.stop()
        for sink in sinks:
            sink.close()
    for packets in received:
        check_stream(packets, payload_type=8)  # seq +1, ts +160, one SSRC, 20 ms pace
        assert [data[12:] for _, data, _ in packets] == payloads  # A-law as audioop's
    assert received[1][0][2][1] == src  # sent from the port the SDP offered
    assert struct.unpack("!I", received[0][0][1][8:12]) != struct.unpack(
        "!I", received[1][0][1][8:12]
    )
    stats = sender.stats()
    assert stats["streams_added"] == 2 and stats["refused"] == 1
    assert late.packets == 2 * len(payloads) and late.ticks == len(payloads)
    assert 0 <= late.p50_s <= late.p99_s <= late.max_s < 1.0
    assert not sender.fifo.exists() and sender.process.returncode == 0


def test_build_is_cached_per_source(tmp_path: Path) -> None:
    first = build(tmp_path)
    assert first.name.startswith("rtpsend-") and first.stat().st_mode & 0o111
    mtime = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_the_sender_source_ships_in_the_wheel(tmp_path: Path) -> None:
    """An installed callrec (not only a clone) can build the sender: its C source is
    package data of agent.testcall."""
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "agent", source / "agent", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("callrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "agent/testcall/rtpsend.c" in names and "agent/testcall/rtpsend.py" in names
