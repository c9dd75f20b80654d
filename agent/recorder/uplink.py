"""Uplink: moves outbox entries to the central store over gRPC, resumably.

For each entry: ask the store how many bytes it holds (QueryUpload), stream the rest
(manifest, chunks with offsets, finish with size + sha256), and delete the local copy
only when the receipt's sha256 equals ours. Transient failures back off exponentially
with full jitter and resume from the store's committed size.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from agent.config import UplinkConfig
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.recorder.finalize import quarantine
from agent.recorder.outbox import Outbox, OutboxEntry

log = logging.getLogger(__name__)

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}
# Resume from the store's committed size (it may have discarded or lost bytes).
RESUME = {
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.FAILED_PRECONDITION,
}

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "callrec.v1.Ingest", "method": "QueryUpload"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_send_message_length", 320 * 1024),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 60.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap_s, self.base_s * 2**self.attempt))
        self.attempt += 1
        return delay


def upload_requests(
    entry: OutboxEntry, offset: int, chunk_bytes: int
) -> Iterator[pb.UploadRequest]:
    yield pb.UploadRequest(manifest=entry.manifest)
    with entry.audio_path.open("rb") as fh:
        fh.seek(offset)
        while data := fh.read(chunk_bytes):
            yield pb.UploadRequest(chunk=pb.Chunk(offset=offset, data=data))
            offset += len(data)
    yield pb.UploadRequest(finish=pb.Finish(size=entry.manifest.size, sha256=entry.manifest.sha256))


class Uplink:
    def __init__(
        self,
        config: UplinkConfig,
        outbox: Outbox,
        quarantine_dir: Path,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.quarantine_dir = quarantine_dir
        self.channel = channel or grpc.insecure_channel(
            config.store_address, options=CHANNEL_OPTIONS
        )
        self.stub = pb_grpc.IngestStub(self.channel)
        self.stop_event = threading.Event()
        self.bytes_sent = 0

    def close(self) -> None:
        self.channel.close()

    def handle(self, recording_id: str) -> None:
        """Upload one outbox entry, retrying until it is safe in the store or we stop."""
        try:
            entry = self.outbox.open(recording_id)
        except FileNotFoundError:
            return  # uploaded and removed by another pass
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                self._upload_once(entry)
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in TRANSIENT and code not in RESUME:
                    self._refused(entry, code, exc.details() or "")
                    return
                delay = backoff.next_delay()
                log.warning(
                    "event=upload_retry recording_id=%s code=%s reason=%r attempt=%d "
                    "retry_in_s=%.1f",
                    recording_id,
                    code.name,
                    (exc.details() or "")[:200],
                    backoff.attempt,
                    delay,
                )
                self.stop_event.wait(delay)

    def _upload_once(self, entry: OutboxEntry) -> None:
        rid = entry.manifest.recording_id
        started = time.monotonic()
        status = self.stub.QueryUpload(pb.QueryUploadRequest(recording_id=rid), timeout=10)
        if status.complete:
            self._done(entry, status.receipt, sent=0, started=started)
            return
        offset = status.committed_size if status.committed_size <= entry.manifest.size else 0
        deadline = 60 + entry.manifest.size / (256 * 1024)  # generous: 256 KiB/s floor
        requests = upload_requests(entry, offset, self.config.chunk_bytes)
        receipt = self.stub.Upload(requests, timeout=deadline)
        sent = entry.manifest.size - offset
        self.bytes_sent += sent
        self._done(entry, receipt, sent=sent, started=started, resumed_at=offset)

    def _done(
        self,
        entry: OutboxEntry,
        receipt: pb.UploadReceipt,
        sent: int,
        started: float,
        resumed_at: int = 0,
    ) -> None:
        self.outbox.remove(entry, receipt)
        log.info(
            "event=recording_uploaded recording_id=%s bytes=%d sent=%d resumed_at=%d "
            "seconds=%.2f outcome=receipt_ok",
            receipt.recording_id,
            receipt.size,
            sent,
            resumed_at,
            time.monotonic() - started,
        )

    def _refused(self, entry: OutboxEntry, code: grpc.StatusCode, details: str) -> None:
        rid = entry.manifest.recording_id
        moved = quarantine(
            entry.path, self.quarantine_dir, f"store refused upload: {code.name}: {details}"
        )
        log.error(
            "event=upload_refused recording_id=%s code=%s reason=%r kept_in=%s",
            rid,
            code.name,
            details,
            moved,
        )
