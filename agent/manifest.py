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
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from agent.capture import CaptureMeta, Direction, parse_iso
from agent.pb.callrec.v1 import recordings_pb2 as pb

MAX_RECORDING_BYTES = 4 * 1024**3
AUDIO_FORMATS = {"opus": "ogg", "flac": "flac", "wav": "wav"}
CUSTOMER_KINDS = {"number", "anonymous", "unknown", "invalid"}
MAX_SEALED_CHARS = 1024  # base64 of an RSA-OAEP block: 512 chars at 3072 bits, 684 at 4096

_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_SITE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MASKED = re.compile(r"^\+\d{1,14}\*\*\*$")
_E164 = re.compile(r"^\+\d{3,15}$")
_FLAG = re.compile(r"^[a-z_]{1,40}$")
_DIRECTIONS = {
    Direction.INBOUND: pb.DIRECTION_INBOUND,
    Direction.OUTBOUND: pb.DIRECTION_OUTBOUND,
    Direction.UNKNOWN: pb.DIRECTION_UNSPECIFIED,
}
DIRECTION_NAMES = {v: k.value for k, v in _DIRECTIONS.items()}


class ManifestError(ValueError):
    """A manifest field is missing or malformed; the message names the field."""


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
    )


def validate_manifest(m: pb.Manifest) -> None:
    """Raise ManifestError naming the first field that is wrong."""
    checks: list[tuple[bool, str]] = [
        (bool(_ID.match(m.recording_id)), "recording_id: expected 32 lower-case hex digits"),
        (bool(_SITE.match(m.site)), "site: expected a site name such as 'hel-1'"),
        (m.source in ("siprec", "plain", "spool"), "source: expected siprec, plain or spool"),
        (0 < len(m.call_ref) <= 64, "call_ref: expected 1..64 characters"),
        (m.HasField("started_at") and m.HasField("ended_at"), "started_at/ended_at: required"),
        (m.started_at.ToNanoseconds() <= m.ended_at.ToNanoseconds(), "ended_at: before started_at"),
        (
            not m.service_number or bool(_E164.match(m.service_number)),
            "service_number: expected E.164 such as +3581005577",
        ),
        (m.audio_format in AUDIO_FORMATS, "audio_format: expected opus, flac or wav"),
        (0 < m.size <= MAX_RECORDING_BYTES, f"size: expected 1..{MAX_RECORDING_BYTES}"),
        (bool(_SHA.match(m.sha256)), "sha256: expected 64 lower-case hex digits"),
        (m.channels in (1, 2), "channels: expected 1 or 2"),
        (len(m.employees) <= 32, "employees: at most 32"),
        (all(_FLAG.match(f) for f in m.flags), "flags: expected lower_case words"),
    ]
    for ok, message in checks:
        if not ok:
            raise ManifestError(message)
    _validate_customer(m.customer)
    for e in m.employees:
        if not e.id or len(e.id) > 64 or not e.name or len(e.name) > 200:
            raise ManifestError("employees: each needs an id and a name")


def _validate_customer(c: pb.Customer) -> None:
    if c.kind not in CUSTOMER_KINDS:
        raise ManifestError("customer.kind: expected number, anonymous, unknown or invalid")
    if c.kind == "number":
        if not _MASKED.match(c.masked):
            raise ManifestError("customer.masked: expected a masked number such as +358401234***")
        if not 0 < len(c.tail_sealed) <= MAX_SEALED_CHARS:
            raise ManifestError(f"customer.tail_sealed: a number needs 1..{MAX_SEALED_CHARS} chars")
        if c.digest and not _SHA.match(c.digest):  # from an agent older than 0005: dropped
            raise ManifestError("customer.digest: expected 64 lower-case hex digits or nothing")
    elif c.masked != c.kind or c.digest or c.tail_sealed:
        raise ManifestError(f"customer: a {c.kind} customer carries no number, digest or seal")


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
