"""A capture: what a recorder (SIP worker or spool pickup) hands to finalize.

On disk a capture is one directory holding the raw legs (mono WAV) and ``capture.json``.
It already holds only the protected form of the customer's number: the privacy
boundary is crossed in memory, before the first byte is written.

Layout under the agent's ``captures/`` directory::

    active/w<N>/<recording id>/   being recorded by worker N (capture.json written at answer)
    ready/<recording id>/         hung up, legs closed; finalize takes it from here

A worker moves a capture from ``active`` to ``ready`` with one ``rename``. While it
records, it holds the capture's ``owner`` lock and beats a heartbeat into it (see
:mod:`agent.recorder.ownership`). A worker that starts and finds captures in its own
``active`` directory whose owner is dead recovers them: they are repaired and flagged
``incomplete``, their end taken from the metadata, the heartbeat and the audio on disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import struct
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.privacy import NumberKind, ProtectedNumber
from agent.recorder.ownership import capture_owned, last_heartbeat

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
    METADATA_INVALID = "metadata_invalid"  # SIPREC metadata unreadable
    METADATA_MISSING = "metadata_missing"  # a SIPREC INVITE without metadata
    NOT_ACKNOWLEDGED = "not_acknowledged"  # the SRC never ACKed our 200 OK
    EMPLOYEE_UNKNOWN = "employee_unknown"  # no employee matched the directory
    CUSTOMER_WITHHELD = "customer_withheld"  # anonymous / restricted caller ID
    CUSTOMER_UNKNOWN = "customer_unknown"  # no customer number given or not a number
    SERVICE_UNKNOWN = "service_unknown"  # no configured service number on the call
    INCOMPLETE = "incomplete"  # the recorder died mid-call; what was written is kept
    RTP_TIMEOUT = "rtp_timeout"  # the sender vanished without BYE
    SILENT_CUSTOMER = "silent_customer"  # no audio on the customer's channel
    SILENT_EMPLOYEE = "silent_employee"  # no audio on the employee's channel
    LENGTH_MISMATCH = "length_mismatch"  # legs differ in length by more than a second
    PAUSED = "paused"  # the recording was paused (see CaptureMeta.pauses): silence there
    DISCARDED = "discarded"  # stopped and discarded at the customer's request: no audio


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
class Pause:
    """An interval of a recording written as silence: who asked ("api:<integration>",
    "src" for a SIPREC a=inactive, "pbx" for a spool sidecar); ``end`` None while the
    pause lasts (a pause never resumed ends with the call)."""

    start: str  # ISO-8601 UTC ms
    end: str | None
    who: str


PAUSE_WHO_MAX = 64


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
    pauses: tuple[Pause, ...] = field(default_factory=tuple)

    @property
    def paused(self) -> bool:
        """A pause is open now."""
        return bool(self.pauses) and self.pauses[-1].end is None

    def with_pauses_closed(self, at: str) -> CaptureMeta:
        """Every open pause ends at ``at`` (the call's end)."""
        closed = tuple(p if p.end is not None else replace(p, end=at) for p in self.pauses)
        return replace(self, pauses=closed)

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
            pauses=tuple(Pause(**p) for p in doc.get("pauses", [])),
        )


META_RESERVE = 8192  # capture.json is padded to this size (see write_meta)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_meta(directory: Path, meta: CaptureMeta, sync: bool = True) -> None:
    """Replace ``capture.json`` atomically (write, fsync unless ``sync`` is false, rename).

    The file is padded with blanks to META_RESERVE bytes, so that when the disk is full
    the update (a call's end time) is written over the old bytes in place, which needs
    no new block; only then, and only if it fits, is the write not atomic."""
    data = meta.to_json().encode()
    data += b" " * max(0, META_RESERVE - len(data) - 1) + b"\n"
    tmp = directory / (CAPTURE_FILE + ".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        tmp.replace(directory / CAPTURE_FILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno not in NO_SPACE or not _overwrite(directory / CAPTURE_FILE, data):
            raise


def _overwrite(path: Path, data: bytes) -> bool:
    """Write ``data`` over an existing file's bytes, blank-padded to its size."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if len(data) > size:
            return False
        os.pwrite(fd, data.rstrip(b"\n").ljust(size - 1) + b"\n", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


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


def cut_wav(path: Path, seconds: float) -> bool:
    """Cut a closed canonical WAV (44-byte header) to at most ``seconds`` of audio, whole
    samples, and fix its sizes; True if it was longer."""
    with path.open("r+b") as fh:
        header = fh.read(44)
        if len(header) < 44 or header[:4] != b"RIFF" or header[36:40] != b"data":
            raise ValueError(f"{path.name}: not a canonical WAV file")
        byte_rate = struct.unpack_from("<I", header, 28)[0] or 16000
        block_align = struct.unpack_from("<H", header, 32)[0] or 1
        keep = max(0, int(seconds * byte_rate))
        keep -= keep % block_align
        if fh.seek(0, os.SEEK_END) - 44 <= keep:
            return False
        fh.truncate(44 + keep)
    repair_wav_header(path)
    return True


def quarantine(entry: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move an entry we cannot process aside, with the reason beside it; nothing is lost.
    (A reason file that can't be written, on a full disk, is left out: the log has it.)"""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / entry.name
    suffix = 1
    while target.exists():
        target = quarantine_dir / f"{entry.name}.{suffix}"
        suffix += 1
    entry.rename(target)
    with contextlib.suppress(OSError):
        (target.parent / f"{target.name}.reason").write_text(reason + "\n")
    return target


def leg_seconds(path: Path) -> float | None:
    """Seconds of audio in a leg as it lies on disk, from its size (the header of a
    leg whose writer died says 0); None if it has no WAV header. Reads only."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            header = fh.read(44)
    except FileNotFoundError:
        return None
    if len(header) < 44 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None
    byte_rate = struct.unpack_from("<I", header, 28)[0] or 16000
    return (size - 44) / byte_rate


@dataclass
class Recovery:
    """What :func:`recover_active` did, capture by capture."""

    recovered: list[str] = field(default_factory=list)
    in_use: list[str] = field(default_factory=list)  # a live process still writes it
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, error): retried later


def recover_active(
    active_dir: Path, ready_dir: Path, quarantine_dir: Path, skip: Collection[str] = ()
) -> Recovery:
    """Move captures a dead worker left in ``active_dir`` to ``ready_dir``, repaired and
    flagged incomplete. A capture whose owner still lives is left alone; one without
    readable metadata is quarantined with the reason; one that fails (a full disk) is
    left for the next attempt, and the others go on. ``skip``: the caller's own."""
    result = Recovery()
    if not active_dir.is_dir():
        return result
    for capture in sorted(p for p in active_dir.iterdir() if p.is_dir() and p.name not in skip):
        try:
            _recover(capture, ready_dir, quarantine_dir, result)
        except OSError as exc:
            result.failed.append((capture.name, f"{type(exc).__name__}: {exc.strerror or exc}"))
    if result.recovered:
        with contextlib.suppress(OSError):
            fsync_dir(ready_dir)
    return result


def _recover(capture: Path, ready_dir: Path, quarantine_dir: Path, result: Recovery) -> None:
    if capture_owned(capture):
        result.in_use.append(capture.name)
        return
    reason: str | None = None
    try:
        meta = read_meta(capture)
    except FileNotFoundError:
        reason = "no capture.json: the call was never answered"
    except (ValueError, KeyError, TypeError) as exc:
        reason = f"unreadable capture.json: {type(exc).__name__}: {exc}"
    if reason is not None:
        quarantine(capture, quarantine_dir, reason)
        result.quarantined.append((capture.name, reason))
        return
    seconds = {leg: leg_seconds(capture / leg) for leg in meta.legs}
    legs = tuple(leg for leg in meta.legs if seconds[leg] is not None)
    started = parse_iso(meta.started_at)
    ends = [started] + [started + dt.timedelta(seconds=s or 0.0) for s in seconds.values()]
    if (beat := last_heartbeat(capture)) is not None:
        ends.append(parse_iso(beat))
    ended = meta.ended_at or iso_ms(max(ends))
    # The end time goes into the metadata first: a failed attempt leaves it there for
    # the next, and the header repairs below (which touch the legs) change no evidence.
    meta = replace(meta, ended_at=ended, legs=legs).with_flags(Flag.INCOMPLETE)
    meta = meta.with_pauses_closed(ended)
    write_meta(capture, meta)
    for leg in legs:
        repair_wav_header(capture / leg)
    ready_dir.mkdir(parents=True, exist_ok=True)
    capture.rename(ready_dir / capture.name)
    result.recovered.append(meta.recording_id)
