"""Helpers for the fault tests (tests/test_faults.py): a small PKI, synthetic captures
dropped into captures/ready/ as a SIP worker leaves them, and the closing check that
the store holds exactly the recordings made."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import certs
from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Direction,
    Employee,
    iso_ms,
    new_recording_id,
    utc_now,
    write_meta,
)
from agent.recorder.finalize import MANIFEST_FILE
from agent.store.catalog import Catalog
from agent.store.ingest import partials
from tests.support.daemons import Daemon
from tests.support.stack import Keys

SITE = "hel-1"
BYTES_PER_AUDIO_S = 8000 * 2 * 2  # the archive WAV: 8 kHz, 16 bit, stereo


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: certs.Issued

    def files(self, stem: str) -> dict[str, object]:
        d = self.directory
        return {"ca_file": str(d / "ca.pem"), "cert_file": str(d / f"{stem}.pem"),
                "key_file": str(d / f"{stem}.key")}  # fmt: skip

    @property
    def store_tls(self) -> dict[str, object]:
        return self.files("store")

    @property
    def agent_uplink(self) -> dict[str, object]:
        return {"insecure": False, **self.files(f"agent-{SITE}")}


def make_pki(directory: Path) -> Pki:
    """A CA, the store's certificate and one agent certificate for SITE."""
    ca = certs.new_ca()
    certs.write_pair(directory, "ca", ca)
    certs.write_pair(directory, "store", certs.issue_store(ca))
    certs.write_pair(directory, f"agent-{SITE}", certs.issue_agent(ca, SITE))
    return Pki(directory, ca)


# ---------------------------------------------------------------- synthetic captures


def _tone_second(freq: int) -> bytes:
    return b"".join(
        struct.pack("<h", int(6000 * math.sin(2 * math.pi * freq * i / 8000))) for i in range(8000)
    )


def write_capture(data_dir: Path, keys: Keys, seconds: int) -> str:
    """A finished two-leg capture, moved into captures/ready/ in one rename."""
    rid = new_recording_id()
    staging = data_dir / "captures" / f".staging-{rid}"
    staging.mkdir(parents=True)
    for leg, freq in ((CUSTOMER_LEG, 440), (EMPLOYEE_LEG, 1000)):
        with wave.open(str(staging / leg), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(_tone_second(freq) * seconds)
    end = utc_now()
    start = end - dt.timedelta(seconds=seconds)
    write_meta(staging, CaptureMeta(
        recording_id=rid, site=SITE, source="siprec", call_ref=rid[:16],
        direction=Direction.INBOUND, started_at=iso_ms(start), ended_at=iso_ms(end),
        service_number="+3581005577", customer=keys.protector().protect("+358 40 123 4567"),
        employees=(Employee("e1001", "Aino Virtanen", "sip:1001@pbx.example", iso_ms(start),
                            "parcels"),),
        legs=(CUSTOMER_LEG, EMPLOYEE_LEG),
    ))  # fmt: skip
    ready = data_dir / "captures" / "ready"
    ready.mkdir(parents=True, exist_ok=True)
    staging.rename(ready / rid)
    return rid


def outbox_shas(data_dir: Path, ids: set[str], timeout: float = 90.0) -> dict[str, str]:
    """The agent's own sha256 of each recording, read from its outbox manifest (the
    uploads must be held back meanwhile: store down or throttled)."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < len(ids):
        for rid in ids - set(found):
            manifest = data_dir / "outbox" / rid / MANIFEST_FILE
            try:
                found[rid] = json.loads(manifest.read_text())["sha256"]
            except (FileNotFoundError, ValueError, KeyError):
                continue
        time.sleep(0.1)
    assert set(found) == ids, f"finalized {len(found)} of {len(ids)}"
    return found


# ---------------------------------------------------------------- the closing check


def wait_stored(root: Path, count: int, timeout: float) -> None:
    catalog = Catalog(f"sqlite:///{root / 'store-data' / 'catalog.sqlite3'}")
    deadline = time.monotonic() + timeout
    outbox = root / "agent-data" / "outbox"
    try:
        while time.monotonic() < deadline:
            if len(catalog.list(limit=10_000)) >= count and not any(outbox.iterdir()):
                return
            time.sleep(0.25)
    finally:
        catalog.close()
    raise AssertionError(f"not all {count} recordings stored in {timeout:.0f}s")


def assert_exactly(root: Path, made: dict[str, str]) -> None:
    """The store holds exactly ``made`` (id → the agent's sha256), each once, and
    nothing is left anywhere on the way."""
    catalog = Catalog(f"sqlite:///{root / 'store-data' / 'catalog.sqlite3'}")
    try:
        rows = catalog.list(limit=10_000)
    finally:
        catalog.close()
    assert sorted(r.recording_id for r in rows) == sorted(made), "each recording exactly once"
    assert {r.recording_id: r.sha256 for r in rows} == made
    assert all(r.site == SITE for r in rows)
    blobs = [p for p in (root / "store-data" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == len(made), "one blob per recording, no orphan copies"
    agent_data = root / "agent-data"
    assert list((agent_data / "outbox").iterdir()) == [], "outbox empty (no .tmp-/.done-)"
    quarantine = agent_data / "quarantine"
    assert not quarantine.exists() or list(quarantine.iterdir()) == []
    assert list((root / "store-data" / "incoming").iterdir()) == []


# ---------------------------------------------------------------- daemons


def tcp_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
        return port


def agent_sections(pki: Pki | None, **uplink_extra: object) -> dict[str, dict[str, object]]:
    up: dict[str, object] = {"backoff_max": "2s", "rescan": "2s", "concurrency": 2}
    up.update(pki.agent_uplink if pki else {"insecure": True})
    up.update(uplink_extra)
    return {"uplink": up, "audio": {"format": "wav"}}


def kill_agent(agent: Daemon) -> None:
    """SIGKILL the agent and its SIP workers (as systemd's control group would)."""
    assert agent.process is not None
    pid = agent.process.pid
    children = [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    agent.process.kill()
    agent.process.wait(10)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def part_size(root: Path, rid: str) -> int:
    """Bytes of audio in the store's partial upload (the part is encrypted records)."""
    return partials.scan(root / "store-data" / "incoming" / f"{rid}.part").plain


def wait_part(root: Path, rid: str, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (size := part_size(root, rid)) >= at_least:
            return size
        time.sleep(0.02)
    raise AssertionError(f"{rid}.part did not reach {at_least} bytes")


UPLOADED = re.compile(
    r"event=recording_uploaded recording_id=(?P<rid>\w+) bytes=(?P<bytes>\d+) sent=(?P<sent>\d+) "
    r"resumed_at=(?P<resumed>\d+) attempts=(?P<attempts>\d+) sent_total=(?P<total>\d+)"
)


def uploaded(agent: Daemon, rid: str) -> dict[str, int]:
    for found in UPLOADED.finditer(agent.text()):
        if found["rid"] == rid:
            return {k: int(v) for k, v in found.groupdict().items() if k != "rid"}
    raise AssertionError(f"no recording_uploaded for {rid}:\n{agent.text()[-3000:]}")


# ---------------------------------------------------------------- a small disk


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (needs root), unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"a tmpfs can't be mounted here (root needed): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(directory: Path) -> Path:
    """Fill ``directory``'s file system to its last page; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = 1 << 20
    try:
        while chunk >= 512:
            try:
                os.write(fd, bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return filler
