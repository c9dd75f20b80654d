"""Helpers for the fault tests (tests/test_faults.py, test_ingest_limits.py): an
agent's ingest client and manifest, synthetic captures dropped into
captures/ready/ as a SIP worker leaves them, and the closing check that the store
holds exactly the recordings made."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
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
from pathlib import Path

import grpc
import pytest

from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    new_recording_id,
    utc_now,
    write_meta,
)
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.finalize import MANIFEST_FILE
from agent.store.catalog import Catalog
from agent.store.ingest import partials
from tests.support.calls import call_meta
from tests.support.daemons import Daemon
from tests.support.pki import SITE, Pki
from tests.support.stack import InProcessStore, Keys

BYTES_PER_AUDIO_S = 8000 * 2 * 2  # the archive WAV: 8 kHz, 16 bit, stereo


# ---------------------------------------------------------------- an agent's uploads


def ingest_stub(store: InProcessStore, pki: Pki, stem: str = f"agent-{SITE}") -> pb_grpc.IngestStub:
    """The Ingest client of the agent whose certificate is ``stem`` (mutual TLS)."""
    return pb_grpc.IngestStub(grpc.secure_channel(store.address, pki.credentials(stem)))


def manifest_for(data: bytes, site: str = SITE) -> pb.Manifest:
    """A valid manifest of a 5 s anonymous call whose audio is ``data``."""
    now = utc_now()
    manifest = pb.Manifest(
        recording_id=new_recording_id(), site=site, source="siprec", call_ref="c" * 16,
        direction=pb.DIRECTION_INBOUND, audio_format="wav", size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), channels=2, region="fi",
        customer=pb.Customer(kind="anonymous", masked="anonymous"),
    )  # fmt: skip
    manifest.started_at.FromDatetime(now - dt.timedelta(seconds=5))
    manifest.ended_at.FromDatetime(now)
    return manifest


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
    write_meta(staging, call_meta(keys, start, end, recording_id=rid))
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


# ---------------------------------------------------------------- signals


def signal_storm(pid: int, signals: tuple[signal.Signals, ...], seconds: float) -> int:
    """Send ``signals`` round-robin to ``pid`` as fast as this process can for
    ``seconds`` (so that some arrive while the last one is being handled); how many
    were sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signals[sent % len(signals)])
        sent += 1
    return sent
