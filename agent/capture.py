"""A capture: what a recorder (SIP worker or spool pickup) hands to finalize.

On disk a capture is one directory holding the raw legs (mono WAV) and ``capture.json``.
It already holds only the protected form of the customer's number: the privacy
boundary is crossed in memory, before the first byte is written.

Layout under the agent's ``captures/`` directory::

    active/w<N>/<recording id>/   being recorded by worker N (capture.json written at answer)
    ready/<recording id>/         hung up, legs closed; finalize takes it from here

A worker moves a capture from ``active`` to ``ready`` with one ``rename``. A worker
that starts and finds captures in its own ``active`` directory recovers them: its
predecessor died mid-call, so they are repaired and flagged ``incomplete``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import struct
import uuid
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.privacy import NumberKind, ProtectedNumber

CAPTURE_FILE = "capture.json"
CUSTOMER_LEG = "customer.wav"
EMPLOYEE_LEG = "employee.wav"
MIXED_LEG = "mixed.wav"
UNKNOWN = "unknown"


class Direction(StrEnum):
    INBOUND = "inbound"  # a customer called a service number
    OUTBOUND = "outbound"  # an employee called a customer from a service line
    UNKNOWN = "unknown"


class Flag(StrEnum):
    METADATA_INVALID = "metadata_invalid"  # SIPREC metadata missing or unreadable
    EMPLOYEE_UNKNOWN = "employee_unknown"  # no employee matched the directory
    CUSTOMER_WITHHELD = "customer_withheld"  # anonymous / restricted caller ID
    CUSTOMER_UNKNOWN = "customer_unknown"  # no customer number given or not a number
    SERVICE_UNKNOWN = "service_unknown"  # no configured service number on the call
    INCOMPLETE = "incomplete"  # the recorder died mid-call; what was written is kept
    RTP_TIMEOUT = "rtp_timeout"  # the sender vanished without BYE
    SILENT_CUSTOMER = "silent_customer"  # no audio on the customer's channel
    SILENT_EMPLOYEE = "silent_employee"  # no audio on the employee's channel
    LENGTH_MISMATCH = "length_mismatch"  # legs differ in length by more than a second


def new_recording_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso_ms(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Employee:
    id: str  # directory id, or "unknown"
    name: str  # as in the directory at the time of the call, or "unknown"
    aor: str  # the SIP identity seen on the call (an internal extension)
    joined_at: str  # ISO-8601 UTC ms
    team: str | None = None  # the team at the time of the call


@dataclass(frozen=True)
class CaptureMeta:
    recording_id: str
    site: str
    source: str  # "siprec", "plain", "spool"
    call_ref: str  # a hash of the SIP Call-ID (or the spool file name), for tracing
    direction: Direction
    started_at: str
    ended_at: str | None
    service_number: str | None
    customer: ProtectedNumber
    employees: tuple[Employee, ...]
    legs: tuple[str, ...]  # CUSTOMER_LEG + EMPLOYEE_LEG, or MIXED_LEG
    flags: tuple[Flag, ...] = field(default_factory=tuple)

    def with_flags(self, *flags: Flag) -> CaptureMeta:
        merged = tuple(dict.fromkeys((*self.flags, *flags)))
        return replace(self, flags=merged)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["customer"]["kind"] = self.customer.kind.value
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CaptureMeta:
        doc: dict[str, Any] = json.loads(text)
        customer = doc["customer"]
        return cls(
            recording_id=doc["recording_id"],
            site=doc["site"],
            source=doc["source"],
            call_ref=doc["call_ref"],
            direction=Direction(doc["direction"]),
            started_at=doc["started_at"],
            ended_at=doc.get("ended_at"),
            service_number=doc.get("service_number"),
            customer=ProtectedNumber(
                kind=NumberKind(customer["kind"]),
                masked=customer["masked"],
                tail_sealed=customer.get("tail_sealed"),
            ),
            employees=tuple(Employee(**e) for e in doc.get("employees", [])),
            legs=tuple(doc["legs"]),
            flags=tuple(Flag(f) for f in doc.get("flags", [])),
        )


def write_meta(directory: Path, meta: CaptureMeta) -> None:
    """Replace ``capture.json`` atomically (write, fsync, rename)."""
    tmp = directory / (CAPTURE_FILE + ".tmp")
    with tmp.open("w") as fh:
        fh.write(meta.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(directory / CAPTURE_FILE)


def read_meta(directory: Path) -> CaptureMeta:
    return CaptureMeta.from_json((directory / CAPTURE_FILE).read_text())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_wav_header(path: Path) -> int:
    """Fix the RIFF and data sizes of a WAV whose writer died before closing it.

    pjsua writes a 44-byte canonical header and fills the sizes in on close; a killed
    writer leaves zeros there while the samples are on disk. Returns the data bytes.
    """
    size = path.stat().st_size
    with path.open("r+b") as fh:
        header = fh.read(44)
        if len(header) < 44 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            raise ValueError(f"{path.name}: not a RIFF/WAVE file")
        if header[36:40] != b"data":
            raise ValueError(f"{path.name}: unexpected WAV layout (no data chunk at 36)")
        block_align = struct.unpack_from("<H", header, 32)[0] or 1
        data = size - 44
        data -= data % block_align
        fh.seek(4)
        fh.write(struct.pack("<I", 36 + data))
        fh.seek(40)
        fh.write(struct.pack("<I", data))
    return data


def recover_active(active_dir: Path, ready_dir: Path) -> list[str]:
    """Move captures a dead worker left in ``active_dir`` to ``ready_dir``, repaired and
    flagged incomplete. Returns the recording ids recovered."""
    recovered: list[str] = []
    if not active_dir.is_dir():
        return recovered
    for capture in sorted(p for p in active_dir.iterdir() if p.is_dir()):
        meta = read_meta(capture)
        latest = meta.started_at
        for leg in meta.legs:
            wav = capture / leg
            if wav.exists():
                # The last write is when the recording stopped: read it before the
                # header repair below touches the file.
                mtime = dt.datetime.fromtimestamp(wav.stat().st_mtime, dt.UTC)
                repair_wav_header(wav)
                latest = max(latest, iso_ms(mtime))
        meta = replace(meta, ended_at=meta.ended_at or latest).with_flags(Flag.INCOMPLETE)
        write_meta(capture, meta)
        ready_dir.mkdir(parents=True, exist_ok=True)
        capture.rename(ready_dir / capture.name)
        recovered.append(meta.recording_id)
    if recovered:
        fsync_dir(ready_dir)
    return recovered
