"""The test RTP sender itself: packets, pacing, and the one-process server mode."""

from __future__ import annotations

import itertools
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.testcall.rtp import ControlServer, FifoControl, RtpSender, StreamSpec
from agent.testcall.scenario import rtp_command
from agent.testcall.sipp import free_port
from tests.support.audio import make_speech, trim
from tests.support.daemons import REPO


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rtp")
    return trim(make_speech(directory).customer, directory / "short.wav", 1.0)


Packet = tuple[float, bytes, tuple[str, int]]


def receive(socks: list[socket.socket], count: int, timeout: float = 5.0) -> list[list[Packet]]:
    """``count`` packets from each socket, read as they arrive (all sockets at once)."""
    packets: list[list[Packet]] = [[] for _ in socks]
    deadline = time.monotonic() + timeout
    while any(len(p) < count for p in packets):
        ready, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            pytest.fail(f"received {[len(p) for p in packets]} of {count} packets")
        for sock in ready:
            data, source = sock.recvfrom(2048)
            packets[socks.index(sock)].append((time.monotonic(), data, source))
    return packets


def check_stream(packets: list[Packet], payload_type: int) -> None:
    headers = [struct.unpack("!BBHII", data[:12]) for _, data, _ in packets]
    assert all(h[0] == 0x80 for h in headers)
    assert headers[0][1] == 0x80 | payload_type  # marker on the first packet
    assert all(h[1] == payload_type for h in headers[1:])
    assert all(len(data) == 12 + 160 for _, data, _ in packets)
    for before, after in itertools.pairwise(headers):
        assert after[2] == (before[2] + 1) & 0xFFFF
        assert after[3] == (before[3] + 160) & 0xFFFFFFFF
        assert after[4] == before[4]
    span = packets[-1][0] - packets[0][0]
    assert abs(span - 0.02 * (len(packets) - 1)) < 0.15  # real-time pacing


def test_command_sends_paced_g711_and_exits(wav: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        src = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.testcall.rtp", "--codec", "pcmu",
             "--to", f"127.0.0.1:{port}={wav},src={src}"],
            cwd=REPO,
        )  # fmt: skip
        try:
            (packets,) = receive([sink], 50)
            assert proc.wait(5) == 0
        finally:
            proc.kill()
            proc.wait()
    check_stream(packets, payload_type=0)
    assert packets[0][2][1] == src  # sent from the port the SDP offered


def test_server_sends_many_streams_from_one_thread(wav: Path) -> None:
    sender = RtpSender().start()
    server = ControlServer(sender).start()
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for sink in sinks:
            sink.bind(("127.0.0.1", 0))
        specs = [StreamSpec("127.0.0.1", s.getsockname()[1], wav) for s in sinks]
        client = subprocess.Popen(
            [sys.executable, "-m", "agent.testcall.rtp",
             "--via", f"{server.address[0]}:{server.address[1]}",
             *(arg for spec in specs for arg in ("--to", spec.format()))],
            cwd=REPO,
        )  # fmt: skip
        try:
            received = receive(sinks, 50)
        finally:
            client.wait(10)
        for packets in received:
            check_stream(packets, payload_type=8)
        assert sender.wait_idle(5)
    finally:
        server.stop()
        sender.stop()
        sender.join(5)
        for sink in sinks:
            sink.close()


@pytest.mark.alone  # bounds the sender's start-up delay
def test_fifo_takes_the_streams_of_concurrent_calls(wav: Path, tmp_path: Path) -> None:
    """What SIPp's exec runs in load tests: one shell line per call into the FIFO."""
    sender = RtpSender().start()
    control = FifoControl(sender, tmp_path / "rtp.fifo").start()
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(6)]
    try:
        for sink in sinks:
            sink.bind(("127.0.0.1", 0))
        specs = [StreamSpec("127.0.0.1", s.getsockname()[1], wav).format() for s in sinks]
        calls = [
            subprocess.Popen(["sh", "-c", rtp_command(pair, control.path, None)],
                             stdout=subprocess.DEVNULL)
            for pair in (specs[0:2], specs[2:4], specs[4:6])
        ]  # fmt: skip
        assert [call.wait(10) for call in calls] == [0, 0, 0]
        for packets in receive(sinks, 50):
            check_stream(packets, payload_type=8)
        assert sender.wait_idle(5)
        assert sender.streams_added == 6
    finally:
        control.stop()
        sender.stop()
        sender.join(5)
        for sink in sinks:
            sink.close()
    assert not control.path.exists()


def test_stream_spec_round_trip() -> None:
    spec = StreamSpec.parse("127.0.0.1:4000=/tmp/a b.wav,src=5000")
    assert spec == StreamSpec("127.0.0.1", 4000, Path("/tmp/a b.wav"), 5000)
    assert StreamSpec.parse(spec.format()) == spec
    with pytest.raises(ValueError, match="HOST:PORT=FILE"):
        StreamSpec.parse("4000=/tmp/a.wav")
