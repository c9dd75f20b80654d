"""The upload manifest: built by the agent from a capture, checked and stored by the store.

The store checks every manifest as untrusted input: ids, hashes and sizes are
well-formed, times are in order, and the customer field holds a masked number, never a
full one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import phonenumbers
from google.protobuf.timestamp_pb2 import Timestamp

from agent.capture import CaptureMeta, Direction, Pause, parse_iso
from agent.pb.callrec.v1 import recordings_pb2 as pb

MAX_RECORDING_BYTES = 4 * 1024**3
AUDIO_FORMATS = {"opus": "ogg", "flac": "flac", "wav": "wav"}
CUSTOMER_KINDS = {"number", "anonymous", "unknown", "invalid"}
MAX_SEALED_CHARS = 1024  # base64 of an RSA-OAEP block: 512 chars at 3072 bits, 684 at 4096

# Every pattern is used with fullmatch: "$" would also accept a trailing newline.
_ID = re.compile(r"[0-9a-f]{32}")
_SHA = re.compile(r"[0-9a-f]{64}")
_SITE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_MASKED = re.compile(r"\+(\d{1,12})\*\*\*")
_E164 = re.compile(r"\+\d{3,15}")
_FLAG = re.compile(r"[a-z_]{1,40}")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_WHO = re.compile(r"[a-z]{2,8}(:[A-Za-z0-9._@-]{1,48})?")
MAX_PAUSES = 64
DISCARDED = "discarded"  # the flag of a recording stopped and discarded: no audio
# Times: a manifest's clock may run ahead of the store's by at most MAX_CLOCK_SKEW; a
# call lasts at most MAX_CALL; nothing is older than EARLIEST (a zero or garbage time).
MAX_CLOCK_SKEW = dt.timedelta(minutes=10)
MAX_CALL = dt.timedelta(hours=24)
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
# Lengths: the catalog's columns (agent.store.catalog) and what the JSON column holds.
MAX_TEXT = {"call_ref": 64, "employee.id": 64, "employee.name": 200, "employee.team": 64,
            "employee.aor": 256, "tail_sealed": 1024, "flags": 400}  # fmt: skip
MAX_FLAGS = 16
_DIRECTIONS = {
    Direction.INBOUND: pb.DIRECTION_INBOUND,
    Direction.OUTBOUND: pb.DIRECTION_OUTBOUND,
    Direction.UNKNOWN: pb.DIRECTION_UNSPECIFIED,
}
DIRECTION_NAMES = {v: k.value for k, v in _DIRECTIONS.items()}


class ManifestError(ValueError):
    """A manifest field is missing or malformed; the message names the field."""


class ClockAhead(ManifestError):
    """A time later than the store's clock allows: the agent's clock is probably wrong
    (the store answers FAILED_PRECONDITION, so the agent keeps the recording in its
    outbox and retries, rather than quarantining it)."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes: what the manifest, the receipt and the store check."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def timestamp(moment: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(dt.UTC))
    return ts


# A stored recording's fields as listings show them (``--json``/``--csv``): each
# command's stable contract; the customer is only ever the masked number.
RECORDING_FIELDS = (
    "recording_id", "started_at", "ended_at", "duration_s", "direction", "site",
    "service_number", "customer_masked", "employee_ids", "employee_names", "audio_format",
    "channels", "flags",
)  # fmt: skip


def recording_fields(info: pb.RecordingInfo, when: Callable[[Timestamp], str]) -> dict[str, object]:
    """``RECORDING_FIELDS`` of a stored recording, its times written by ``when``."""
    m = info.manifest
    return {
        "recording_id": m.recording_id,
        "started_at": when(m.started_at),
        "ended_at": when(m.ended_at),
        "duration_s": info.duration_ms / 1000,
        "direction": DIRECTION_NAMES.get(m.direction, "unspecified"),
        "site": m.site,
        "service_number": m.service_number,
        "customer_masked": m.customer.masked,
        "employee_ids": [e.id for e in m.employees],
        "employee_names": [e.name for e in m.employees],
        "audio_format": m.audio_format,
        "channels": m.channels,
        "flags": list(m.flags),
    }


def manifest_from_capture(
    meta: CaptureMeta, audio_format: str, channels: int, size: int, sha256: str, region: str
) -> pb.Manifest:
    if meta.ended_at is None:
        raise ManifestError("ended_at: the capture has not ended")
    customer = meta.customer
    return pb.Manifest(
        recording_id=meta.recording_id,
        site=meta.site,
        source=meta.source,
        call_ref=meta.call_ref,
        direction=_DIRECTIONS[meta.direction],
        started_at=timestamp(parse_iso(meta.started_at)),
        ended_at=timestamp(parse_iso(meta.ended_at)),
        service_number=meta.service_number or "",
        customer=pb.Customer(
            kind=customer.kind.value,
            masked=customer.masked,
            tail_sealed=customer.tail_sealed or "",
        ),
        employees=[
            pb.Employee(
                id=e.id,
                name=e.name,
                aor=e.aor,
                team=e.team or "",
                joined_at=timestamp(parse_iso(e.joined_at)),
            )
            for e in meta.employees
        ],
        flags=[f.value for f in meta.flags],
        audio_format=audio_format,
        size=size,
        sha256=sha256,
        channels=channels,
        region=region,
        pauses=[_pause(p, meta.ended_at) for p in meta.pauses],
    )


def _pause(pause: Pause, ended_at: str) -> pb.Pause:
    """A pause for the manifest (one left open ends with the call)."""
    return pb.Pause(
        start=timestamp(parse_iso(pause.start)),
        end=timestamp(parse_iso(pause.end or ended_at)),
        who=pause.who,
    )


def discard_manifest_from_capture(meta: CaptureMeta, region: str) -> pb.Manifest:
    """The manifest of a discarded recording: the call's facts, no audio."""
    return manifest_from_capture(meta, "", 0, 0, "", region)


def validate_manifest(m: pb.Manifest, now: dt.datetime | None = None) -> None:
    """Raise ManifestError naming the first field that is wrong. Everything the store
    will write is checked here, before anything is written: patterns (whole-string),
    lengths that fit the catalog's columns, times within ``MAX_CLOCK_SKEW`` of ``now``
    (the store's clock) and a call no longer than ``MAX_CALL``."""
    checks: list[tuple[bool, str]] = [
        (bool(_ID.fullmatch(m.recording_id)), "recording_id: expected 32 lower-case hex digits"),
        (bool(_SITE.fullmatch(m.site)), "site: expected a site name such as 'hel-1'"),
        (m.source in ("siprec", "plain", "spool"), "source: expected siprec, plain or spool"),
        (0 < len(m.call_ref) <= MAX_TEXT["call_ref"], "call_ref: expected 1..64 characters"),
        (m.direction in DIRECTION_NAMES, "direction: expected inbound, outbound or unspecified"),
        (
            not m.service_number or bool(_E164.fullmatch(m.service_number)),
            "service_number: expected E.164 such as +3581005577",
        ),
        (m.audio_format in AUDIO_FORMATS, "audio_format: expected opus, flac or wav"),
        (0 < m.size <= MAX_RECORDING_BYTES, f"size: expected 1..{MAX_RECORDING_BYTES}"),
        (bool(_SHA.fullmatch(m.sha256)), "sha256: expected 64 lower-case hex digits"),
        (m.channels in (1, 2), "channels: expected 1 or 2"),
        (not m.region or bool(_REGION.fullmatch(m.region)), "region: expected e.g. 'fi'"),
        (len(m.employees) <= 32, "employees: at most 32"),
        (len(m.flags) <= MAX_FLAGS, f"flags: at most {MAX_FLAGS}"),
        (all(_FLAG.fullmatch(f) for f in m.flags), "flags: expected lower_case words"),
        (len(",".join(m.flags)) <= MAX_TEXT["flags"], "flags: at most 400 characters in all"),
    ]
    for ok, message in checks:
        if not ok:
            raise ManifestError(message)
    _validate_parties_and_times(m, now)


def _validate_parties_and_times(m: pb.Manifest, now: dt.datetime | None) -> None:
    _validate_times(m, now or dt.datetime.now(dt.UTC))
    _validate_pauses(m)
    _validate_customer(m.customer)
    for e in m.employees:
        _validate_employee(e)


def validate_discard_manifest(m: pb.Manifest, now: dt.datetime | None = None) -> None:
    """A discarded recording's manifest: what :func:`validate_manifest` checks, except
    the audio, which must be absent."""
    audio = pb.Manifest(audio_format="wav", size=1, sha256="0" * 64, channels=1)
    with_audio = pb.Manifest()
    with_audio.CopyFrom(m)
    with_audio.MergeFrom(audio)
    if m.audio_format or m.size or m.sha256 or m.channels:
        raise ManifestError("a discarded recording carries no audio (format, size, sha256)")
    if DISCARDED not in m.flags:
        raise ManifestError("flags: a discarded recording is flagged 'discarded'")
    validate_manifest(with_audio, now)


def _validate_pauses(m: pb.Manifest) -> None:
    """Pauses lie within the call, in order, each said who asked."""
    if len(m.pauses) > MAX_PAUSES:
        raise ManifestError(f"pauses: at most {MAX_PAUSES}")
    started, ended = m.started_at.ToDatetime(dt.UTC), m.ended_at.ToDatetime(dt.UTC)
    before = started
    for p in m.pauses:
        if not (p.HasField("start") and p.HasField("end")):
            raise ManifestError("pauses: each needs a start and an end")
        start, end = _time_of(p.start, "pauses.start"), _time_of(p.end, "pauses.end")
        if not before <= start <= end <= ended:
            raise ManifestError("pauses: expected in order, within the call")
        if not _WHO.fullmatch(p.who):
            raise ManifestError("pauses.who: expected e.g. 'api:crm', 'src' or 'pbx'")
        before = end


def pauses_json(m: pb.Manifest) -> str:
    """The catalog's form of a manifest's pauses (ISO-8601 UTC ms)."""
    return json.dumps(
        [
            {
                "start": p.start.ToDatetime(dt.UTC).isoformat(timespec="milliseconds"),
                "end": p.end.ToDatetime(dt.UTC).isoformat(timespec="milliseconds"),
                "who": p.who,
            }
            for p in m.pauses
        ]
    )


def _time_of(ts: Timestamp, name: str) -> dt.datetime:
    """A Timestamp as a datetime, or ManifestError (out of range, bad nanos)."""
    if not 0 <= ts.nanos <= 999_999_999:
        raise ManifestError(f"{name}: nanos out of range")
    try:
        return ts.ToDatetime(dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise ManifestError(f"{name}: not a time between 0001 and 9999") from None


def _validate_times(m: pb.Manifest, now: dt.datetime) -> None:
    if not (m.HasField("started_at") and m.HasField("ended_at")):
        raise ManifestError("started_at/ended_at: required")
    started, ended = _time_of(m.started_at, "started_at"), _time_of(m.ended_at, "ended_at")
    latest = now + MAX_CLOCK_SKEW
    for name, moment in (("started_at", started), ("ended_at", ended)):
        if not EARLIEST <= moment <= latest:
            raise (ClockAhead if moment > latest else ManifestError)(
                f"{name}: {moment.isoformat(timespec='seconds')} is not between "
                f"{EARLIEST.date()} and the store's clock + {MAX_CLOCK_SKEW} "
                "(is the agent's clock right?)"
            )
    if ended < started:
        raise ManifestError("ended_at: before started_at")
    if ended - started > MAX_CALL:
        raise ManifestError(f"ended_at: the call lasts longer than {MAX_CALL}")
    for e in m.employees:
        if e.HasField("joined_at"):
            _time_of(e.joined_at, "employees.joined_at")


def _validate_employee(e: pb.Employee) -> None:
    if not e.id or len(e.id) > MAX_TEXT["employee.id"] or not e.id.isprintable():
        raise ManifestError("employees: each needs an id of 1..64 printable characters")
    if not e.name or len(e.name) > MAX_TEXT["employee.name"] or not e.name.isprintable():
        raise ManifestError("employees: each needs a name of 1..200 printable characters")
    if len(e.team) > MAX_TEXT["employee.team"] or len(e.aor) > MAX_TEXT["employee.aor"]:
        raise ManifestError("employees: team at most 64 characters, aor at most 256")


def _validate_customer(c: pb.Customer) -> None:
    if c.kind not in CUSTOMER_KINDS:
        raise ManifestError("customer.kind: expected number, anonymous, unknown or invalid")
    if c.kind == "number":
        if not masked_is_plausible(c.masked):
            raise ManifestError(
                "customer.masked: expected a masked number such as +358401234*** (the full "
                "number's E.164 form with its last three digits as ***)"
            )
        if not 0 < len(c.tail_sealed) <= MAX_SEALED_CHARS:
            raise ManifestError(f"customer.tail_sealed: a number needs 1..{MAX_SEALED_CHARS} chars")
        if c.digest and not _SHA.fullmatch(c.digest):  # from an agent older than 0005: dropped
            raise ManifestError("customer.digest: expected 64 lower-case hex digits or nothing")
    elif c.masked != c.kind or c.digest or c.tail_sealed:
        raise ManifestError(f"customer: a {c.kind} customer carries no number, digest or seal")


def masked_is_plausible(masked: str) -> bool:
    """``+<digits>***``: the digits before ``***`` and three more must make a number
    phonenumbers finds possible for its country (E.164: at most 15 digits), and a
    form whose digits are themselves a valid number while no completion of them is
    valid (a full number with ``***`` appended) is refused. Numbering plans with
    variable lengths (e.g. German landlines) can't tell the two apart: there the
    check only bounds the length."""
    match = _MASKED.fullmatch(masked)
    if match is None:
        return False
    digits = match.group(1)
    if len(digits) + 3 > 15:
        return False
    try:
        completions = [phonenumbers.parse(f"+{digits}{tail}") for tail in ("000", "500", "999")]
        if not phonenumbers.is_possible_number(completions[0]):
            return False
        if any(phonenumbers.is_valid_number(n) for n in completions):
            return True
        return not phonenumbers.is_valid_number(phonenumbers.parse(f"+{digits}"))
    except phonenumbers.NumberParseException:
        return False


def employees_json(m: pb.Manifest) -> str:
    return json.dumps(
        [
            {
                "id": e.id,
                "name": e.name,
                "aor": e.aor,
                "team": e.team or None,
                "joined_at": e.joined_at.ToDatetime(dt.UTC).isoformat(timespec="milliseconds"),
            }
            for e in m.employees
        ]
    )


class CallColumns(TypedDict):
    """The catalog columns a stored recording and a discarded one share."""

    recording_id: str
    site: str
    source: str
    call_ref: str
    direction: str
    started_at_ms: int
    ended_at_ms: int
    customer_masked: str
    employee_id: str
    employees_json: str
    flags: str


def call_columns(m: pb.Manifest) -> CallColumns:
    """A (checked) manifest's call facts as catalog columns; the first employee is the
    row's ``employee_id`` ("unknown" when none)."""
    return CallColumns(
        recording_id=m.recording_id,
        site=m.site,
        source=m.source,
        call_ref=m.call_ref,
        direction=DIRECTION_NAMES[m.direction],
        started_at_ms=m.started_at.ToMilliseconds(),
        ended_at_ms=m.ended_at.ToMilliseconds(),
        customer_masked=m.customer.masked,
        employee_id=m.employees[0].id if m.employees else "unknown",
        employees_json=employees_json(m),
        flags=",".join(m.flags),
    )
