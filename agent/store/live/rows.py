"""A live recording as the store holds it: its row, states and legs.

``live_recordings`` holds one row per call streamed while it runs: its manifest, its
wrapped data key, its state (``live`` → ``finished`` → ``archived``, or ``held`` for a
call the store timed out, ``agent.store.live.tail``) and, once finished, its final
document. The storage of its segments is ``agent.store.live.segments``; the archiving
queue and removal, ``agent.store.live.archive_queue``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format

from agent import g711
from agent.pb.callrec.v1 import recordings_pb2 as pb

LEGS = {1: ("mixed",), 2: ("customer", "employee")}
ALL_LEGS = ("mixed", "customer", "employee")
MAX_CALL_SECONDS = 24 * 3600  # a call lasts at most a day
LIVE = "live"
FINISHED = "finished"  # waiting for its archive
ARCHIVED = "archived"  # the archive is stored, the segments gone; kept to answer a late finish
HELD = "held"  # timed out and archived; segments kept for a returning agent's tail


class LiveRejected(Exception):
    """An append or finish the store refuses; the message says what to do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LiveRow:
    recording_id: str
    site: str
    state: str
    manifest: pb.Manifest
    final: dict[str, Any] | None
    key_id: str
    wrapped_key: bytes
    last_append_ms: int
    # how the legs arrived (agent.g711): their offsets and sizes count bytes in it
    encoding: str = g711.PCM16

    @property
    def legs(self) -> tuple[str, ...]:
        return LEGS[self.manifest.channels]

    @property
    def bytes_per_second(self) -> int:
        """Bytes of one leg per second of audio, in the call's encoding."""
        return g711.bytes_per_second(self.encoding)

    @property
    def max_leg_bytes(self) -> int:
        return self.bytes_per_second * MAX_CALL_SECONDS

    def final_from(self) -> str:
        """What a reopened call's archive replaces: ``held`` (an archive is stored) or
        ``finished`` (one may be, if an archiver was encoding it)."""
        return str((self.final or {}).get("reopened_from") or self.state)

    def carried(self) -> dict[str, Any]:
        """What a new final document keeps of the old (a reopened call stays one)."""
        held = (self.final or {}).get("reopened_from")
        return {"reopened_from": held} if held else {}

    def final_manifest(self) -> pb.Manifest:
        assert self.final is not None
        return json_format.ParseDict(self.final["manifest"], pb.Manifest())


def row_from(found: sa.Row[Any]) -> LiveRow:
    """A ``live_recordings`` row as a LiveRow."""
    return LiveRow(
        recording_id=found.recording_id,
        site=found.site,
        state=found.state,
        manifest=json_format.Parse(found.manifest_json, pb.Manifest()),
        final=json.loads(found.final_json) if found.final_json else None,
        key_id=found.key_id,
        wrapped_key=found.wrapped_key,
        last_append_ms=found.last_append_ms,
        encoding=found.encoding,
    )
