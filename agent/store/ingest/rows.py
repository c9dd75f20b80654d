"""A checked manifest as the store's catalog row, and a stored row as the receipt the
agent waits for (``agent.store.ingest.service``; ``agent.store.live.archiver`` makes
the row of a call streamed live the same way)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from agent.manifest import call_columns, pauses_json
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.catalog import RecordingRow, from_ms, now_ms


def receipt_of(row: RecordingRow) -> pb.UploadReceipt:
    stored = Timestamp()
    stored.FromDatetime(from_ms(row.stored_at_ms))
    return pb.UploadReceipt(
        recording_id=row.recording_id, sha256=row.sha256, size=row.size, stored_at=stored
    )


def row_from_manifest(m: pb.Manifest, blob_key: str, region: str) -> RecordingRow:
    first = m.employees[0] if m.employees else None
    return RecordingRow(
        **call_columns(m),
        service_number=m.service_number or None,
        customer_kind=m.customer.kind,
        customer_digest=None,  # never kept: see agent.store.keys.numbers
        customer_digest_key_id=None,
        customer_tail_sealed=m.customer.tail_sealed or None,
        employee_name=first.name if first else "unknown",
        employee_team=(first.team or None) if first else None,
        audio_format=m.audio_format,
        channels=m.channels,
        size=m.size,
        sha256=m.sha256,
        blob_key=blob_key,
        region=region,
        stored_at_ms=now_ms(),
        pauses_json=pauses_json(m) if m.pauses else None,
    )
