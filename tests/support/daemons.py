"""The real daemons as subprocesses (`callrec store`, `callrec agent`), logging to files
the tests read afterwards, exactly as an operator would tail them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.stack import Keys, agent_config, write_toml

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Daemon:
    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **self.env},
            )
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            found = regex.search(self.text(), after)
            if found:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.process.returncode}:\n{self.text()[-3000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {pattern!r} in {timeout}s:\n{self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def start_store(
    root: Path,
    port: int = 0,
    env: dict[str, str] | None = None,
    tls: dict[str, object] | None = None,
    **store: str,
) -> tuple[Daemon, str]:
    """``tls``: the ``[store.tls]`` table (default: plain text on loopback, asked for).
    Starting again on the same ``root`` appends to the same log and config."""
    doc: dict[str, dict[str, object]] = {
        "store": {"listen": f"127.0.0.1:{port}", "data_dir": str(root / "store-data"), **store},
        "store.tls": tls or {"insecure": True},
    }
    config = write_toml(root / "store.toml", doc)
    daemon = Daemon(
        "store", ["store", "--config", str(config)], root / "logs" / "store.log", env or {}
    )
    seen = len(daemon.text())
    try:
        found = daemon.start().wait_for(r"event=store_ready address=(\S+)", after=seen)
    except BaseException:
        daemon.stop()
        raise
    return daemon, found.group(1)


def start_agent(
    root: Path,
    keys: Keys,
    store_address: str,
    sip_port: int,
    env: dict[str, str] | None = None,
    ready_timeout: float = 60.0,
    **sections: dict[str, object],
) -> Daemon:
    sections.setdefault("sip", {}).update({"port": sip_port})
    _, doc = agent_config(root, keys, store_address, sip_port=sip_port, **sections)
    config = write_toml(root / "agent.toml", doc)
    daemon = Daemon(
        "agent", ["agent", "--config", str(config)], root / "logs" / "agent.log", env or {}
    )
    seen = len(daemon.text())
    try:
        daemon.start().wait_for(r"event=agent_ready", timeout=ready_timeout, after=seen)
    except BaseException:
        daemon.stop()
        raise
    return daemon


class NotifySocket:
    """A fake service manager: collects the datagrams sent to $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def states(self) -> list[str]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextmanager
def running(*daemons: Daemon) -> Iterator[None]:
    try:
        yield
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
