"""Synthetic calls for tests and benches: a capture's metadata as the SIP worker writes
it (the customer's number already protected) and an outbox entry as finalize leaves it
(audio + manifest, one rename)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format

from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Direction,
    Employee,
    iso_ms,
    new_recording_id,
)
from agent.manifest import manifest_from_capture
from agent.recorder.finalize import MANIFEST_FILE, audio_file_name
from tests.support.pki import SITE
from tests.support.stack import Keys

CUSTOMER = "+358 40 123 4567"
AINO = ("e1001", "Aino Virtanen")


def call_meta(
    keys: Keys,
    start: dt.datetime,
    end: dt.datetime,
    employee: tuple[str, str] = AINO,
    recording_id: str | None = None,
) -> CaptureMeta:
    """An answered inbound SIPREC call of CUSTOMER to the service number, handled by
    ``employee`` (id, name) at extension 1001, both legs recorded."""
    rid = recording_id or new_recording_id()
    return CaptureMeta(
        recording_id=rid, site=SITE, source="siprec", call_ref=rid[:16],
        direction=Direction.INBOUND, started_at=iso_ms(start), ended_at=iso_ms(end),
        service_number="+3581005577", customer=keys.protector().protect(CUSTOMER),
        employees=(Employee(*employee, "sip:1001@pbx.example", iso_ms(start), "parcels"),),
        legs=(CUSTOMER_LEG, EMPLOYEE_LEG),
    )  # fmt: skip


def outbox_entry(
    outbox_dir: Path, meta: CaptureMeta, size: int, sha256: str, put_audio: Callable[[Path], object]
) -> str:
    """The outbox entry of ``meta`` with ``size`` bytes of Opus audio that
    ``put_audio(path)`` writes (or links); returns the recording id."""
    rid = meta.recording_id
    manifest = manifest_from_capture(meta, "opus", 2, size, sha256, "fi")
    staging = outbox_dir / f".tmp-{rid}"
    staging.mkdir(parents=True)
    put_audio(staging / audio_file_name("opus"))
    (staging / MANIFEST_FILE).write_text(json_format.MessageToJson(manifest, indent=1))
    staging.rename(outbox_dir / rid)
    return rid
