"""journald's native protocol, against a real unix datagram socket standing in for
``/run/systemd/journal/socket``: what arrives is parsed as journald parses it."""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import logs
from agent.journal import JournalHandler


def parse_entry(data: bytes) -> dict[str, str]:
    """journald's reading of a native-protocol datagram."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:  # binary-safe form: KEY \n <u64 le length> value \n
            key = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(5)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.seals = 0

    def receive(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:  # a sealed memfd: the entry is its content (journald maps it)
            assert data == b""
            self.seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            with os.fdopen(fds[0], "rb") as fh:
                fh.seek(0)
                data = fh.read()
        return parse_entry(data)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "j.sock")
    yield j
    j.sock.close()


@pytest.fixture
def under_systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield stream
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved


def test_records_arrive_as_structured_entries(journal: Journal, under_systemd: io.StringIO) -> None:
    logs.configure("info", under_systemd, identifier="callrec-agent", journal_socket=journal.path)
    log = logs.get_logger("agent.recorder.uplink.client")
    rid = "2efaca6d1f344b51817a639917a40405"
    log.warning(
        "upload_retry",
        recording_id=rid,
        code="UNAVAILABLE",
        reason="store down\nfor 0401234567",
        retry_in_s=1.5,
        attempt=3,
        message="ours",
    )
    entry = journal.receive()
    assert entry["MESSAGE"] == (
        f"agent.recorder.uplink.client level=warning event=upload_retry recording_id={rid} "
        'code=UNAVAILABLE reason="store down\\nfor <redacted>" retry_in_s=1.5 attempt=3 '
        "message=ours"
    )
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "callrec-agent"
    assert entry["LOGGER"] == "agent.recorder.uplink.client"
    assert entry["EVENT"] == "upload_retry"
    assert entry["RECORDING_ID"] == rid  # journalctl RECORDING_ID=… finds it
    assert entry["REASON"] == "store down\nfor <redacted>"  # binary-safe, still redacted
    assert (entry["RETRY_IN_S"], entry["ATTEMPT"]) == ("1.5", "3")
    assert entry["CALLREC_MESSAGE"] == "ours"  # never overrides journald's own fields
    assert under_systemd.getvalue() == ""


def test_library_records_and_big_entries(journal: Journal, under_systemd: io.StringIO) -> None:
    logs.configure("info", under_systemd, journal_socket=journal.path)
    logging.getLogger("grpc").error("connection reset\r\nby peer")
    entry = journal.receive()
    assert entry["EVENT"] == "log" and entry["MSG"] == "connection reset\r\nby peer"
    assert entry["MESSAGE"] == 'grpc level=error event=log msg="connection reset\\r\\nby peer"'
    assert entry["PRIORITY"] == "3" and entry["SYSLOG_IDENTIFIER"] == "callrec"

    big = "x" * (2 << 20)  # more than a datagram holds: sent as a sealed memfd
    logs.get_logger("agent.test").info("big", value=big)
    entry = journal.receive()
    assert entry["EVENT"] == "big" and entry["VALUE"] == big
    assert journal.seals & fcntl.F_SEAL_WRITE and journal.seals & fcntl.F_SEAL_SEAL


def test_without_the_socket_lines_go_to_stdout(tmp_path: Path, under_systemd: io.StringIO) -> None:
    logs.configure("info", under_systemd, journal_socket=tmp_path / "missing.sock")
    logs.get_logger("agent.test").info("hello", n=1)
    assert under_systemd.getvalue() == "<6>agent.test event=hello n=1\n"


def test_a_socket_that_goes_away_falls_back_to_stdout(
    journal: Journal, under_systemd: io.StringIO
) -> None:
    handler = JournalHandler("callrec", journal.path, under_systemd)
    logger = logging.getLogger("agent.test.gone")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        journal.sock.close()
        journal.path.unlink()
        logs.get_logger("agent.test.gone").error("store_unreachable", waiting=2)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()
    assert under_systemd.getvalue() == (
        "<3>agent.test.gone level=error event=store_unreachable waiting=2\n"
    )
