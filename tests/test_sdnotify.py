"""agent.sdnotify against real AF_UNIX datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5.0)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = str(tmp_path / "notify.sock")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"callrec-test-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_helpers_send_exact_datagrams_to_a_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.ready()
    assert sdnotify.watchdog()
    assert sdnotify.status("recording calls=3 workers=2")
    assert sdnotify.stopping()
    assert sdnotify.notify("RELOADING=1\nMONOTONIC_USEC=5")

    received = [path_socket.recv(4096) for _ in range(5)]

    assert received == [
        b"READY=1",
        b"WATCHDOG=1",
        b"STATUS=recording calls=3 workers=2",
        b"STOPPING=1",
        b"RELOADING=1\nMONOTONIC_USEC=5",
    ]


def test_abstract_socket_with_leading_at(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready()
    assert abstract_socket.recv(4096) == b"READY=1"


def test_status_keeps_to_one_line(path_socket: socket.socket) -> None:
    assert sdnotify.status("draining\ncalls=2\r\n")
    assert path_socket.recv(4096) == b"STATUS=draining calls=2"


def test_environment_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()
    address = str(tmp_path / "late.sock")
    with _receiver(address) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert sdnotify.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "vsock:2:1234"])
def test_unset_or_unusable_socket_is_a_noop(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_socket_that_nobody_listens_on_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("usec", "expected"),
    [("30000000", 30.0), ("1500000", 1.5), ("250", 0.00025)],
)
def test_watchdog_interval_from_usec(
    usec: str, expected: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert sdnotify.watchdog_interval() == pytest.approx(expected)


@pytest.mark.parametrize("usec", [None, "", "0", "-5", "abc", "1.5", "²"])
def test_watchdog_interval_absent_or_malformed(
    usec: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert sdnotify.watchdog_interval() is None


def test_watchdog_pid_must_be_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "not-a-pid")
    assert sdnotify.watchdog_interval() is None
