"""Uplink: moves outbox entries to the central store over gRPC, resumably.

For each entry: ask the store how many bytes it holds (QueryUpload), stream the rest
(manifest, chunks with offsets, finish with size + sha256), and delete the local copy
only when the receipt's sha256 equals ours. Transient failures back off exponentially
with full jitter and resume from the store's committed size. While the store is
unreachable all workers share one backoff (``RetryGate``) and the operator reads one
line when that starts and ends (``StoreReachability``); an entry that keeps failing on
its own is left for the next rescan after a few attempts, so it never blocks the rest.

The channel is mutual TLS (``agent.certs``) unless ``[uplink] insecure = true`` on a
loopback address; every call has a deadline.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent import logs, metrics
from agent.capture import quarantine
from agent.certs import channel_credentials, load_cert, site_of
from agent.config import ConfigError, UplinkConfig, check_transport
from agent.manifest import DISCARDED
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import check_private_file
from agent.recorder.uplink.outbox import Outbox, OutboxEntry
from agent.recorder.uplink.reachability import StoreReachability

log = logs.get_logger(__name__)

# The store (or the way to it) is unreachable or refuses this agent: every worker waits
# for the same shared backoff, and the recording stays in the outbox.
STORE_LEVEL = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
# Something about this one upload: retry it (resuming from the store's committed size,
# which it may have lowered or discarded), a few times per pass, then leave it for the
# next rescan so one stubborn entry never holds a worker.
ENTRY_LEVEL = {
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
TRANSIENT = STORE_LEVEL | ENTRY_LEVEL
ENTRY_ATTEMPTS_PER_PASS = 5
QUERY_TIMEOUT_S = 10.0
ENTRY_LOCK_WAIT_S = 10.0  # for a control API's rewrite of the manifest (milliseconds)
MIN_UPLOAD_RATE = 256 * 1024  # bytes/s: the upload deadline assumes at least this

_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "callrec.v1.Ingest", "method": "QueryUpload"}],
                "timeout": f"{QUERY_TIMEOUT_S:.0f}s",
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

# Keepalive: ping every 30 s, also while a stream sends nothing (a stalled upload
# notices a dead store in ~40 s); the store permits pings every 15 s
# (server.MIN_CLIENT_PING_INTERVAL_MS), so it never answers "too_many_pings".
KEEPALIVE_TIME_MS = 30_000
CHANNEL_OPTIONS = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_send_message_length", 320 * 1024),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
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


class RetryGate:
    """One backoff shared by all upload workers while the store is unreachable: they
    wait for the same moment instead of each probing it on its own schedule."""

    def __init__(self, stop_event: threading.Event, cap_s: float) -> None:
        self.stop_event = stop_event
        self._lock = threading.Lock()
        self._backoff = Backoff(cap_s=cap_s)
        self._not_before = 0.0

    def wait(self) -> bool:
        """Block until the next attempt may start; False when stopping."""
        while not self.stop_event.is_set():
            with self._lock:
                left = self._not_before - time.monotonic()
            if left <= 0:
                return True
            self.stop_event.wait(left)
        return False

    def failed(self) -> float:
        """Back off (unless another worker already did); the seconds until the next try."""
        with self._lock:
            now = time.monotonic()
            if self._not_before <= now:
                self._not_before = now + self._backoff.next_delay()
            return self._not_before - now

    def succeeded(self) -> None:
        with self._lock:
            self._backoff.attempt = 0
            self._not_before = 0.0

    @property
    def attempt(self) -> int:
        return self._backoff.attempt


def make_channel(config: UplinkConfig, site: str | None = None) -> grpc.Channel:
    """Mutual TLS to the store; plain text only if asked for (config checks loopback)."""
    check_transport(config)
    if config.tls is None:
        log.warning(
            "uplink_insecure",
            store=config.store_address,
            tls="OFF",
            reason="[uplink] insecure = true: recordings travel unencrypted and the store cannot "
            "verify this site; for a loopback test install only",
        )
        return grpc.insecure_channel(config.store_address, options=CHANNEL_OPTIONS)
    tls = config.tls
    cert = load_cert(tls.cert_file)
    check_private_file(tls.key_file)
    if site is not None and site_of(cert) != site:
        raise ConfigError(
            f"[uplink] cert_file = {str(tls.cert_file)!r}: the certificate is for site "
            f"{site_of(cert)!r}, this agent is [agent] site = {site!r}"
        )
    log.info(
        "uplink_tls",
        store=config.store_address,
        site=site_of(cert),
        cert_expires=cert.not_valid_after_utc.date().isoformat(),
    )
    credentials = channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)
    return grpc.secure_channel(config.store_address, credentials, options=CHANNEL_OPTIONS)


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


@dataclass
class _Progress:
    """What one ``handle`` call has put on the wire, over all its attempts."""

    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    sent_total: int = 0
    sent: int = 0  # in the current attempt

    def counted(self, requests: Iterator[pb.UploadRequest]) -> Iterator[pb.UploadRequest]:
        self.sent = 0
        for request in requests:
            if request.WhichOneof("kind") == "chunk":
                self.sent += len(request.chunk.data)
                self.sent_total += len(request.chunk.data)
                metrics.UPLOAD_BYTES_SENT.inc(len(request.chunk.data))
            yield request


class Uplink:
    def __init__(
        self,
        config: UplinkConfig,
        outbox: Outbox,
        quarantine_dir: Path,
        channel: grpc.Channel | None = None,
        site: str | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.quarantine_dir = quarantine_dir
        self.channel = channel or make_channel(config, site)
        self.stub = pb_grpc.IngestStub(self.channel)
        self.stop_event = threading.Event()
        self.gate = RetryGate(self.stop_event, config.backoff_max_s)
        self.reachability = StoreReachability(
            lambda: len(self.outbox.entries()), config.store_down_summary_s
        )
        self.bytes_sent = 0

    def close(self) -> None:
        self.channel.close()

    def handle(self, recording_id: str) -> None:
        """Upload one outbox entry: retry until it is safe in the store, we stop, or it
        has failed ENTRY_ATTEMPTS_PER_PASS times on its own (the rescan offers it again)."""
        entry = self._open(recording_id)
        if entry is None:
            return
        progress, backoff = _Progress(), Backoff(cap_s=self.config.backoff_max_s)
        while self.gate.wait():
            try:
                # Under the entry's lock, read afresh: the control API may have bound an
                # employee to it (agent.recorder.control.desk).
                with self.outbox.locked(recording_id, ENTRY_LOCK_WAIT_S) as held:
                    fresh = self._open(recording_id) if held else None
                    if fresh is None:
                        return  # gone (uploaded by another pass), or left for the rescan
                    entry = fresh
                    self._upload_once(entry, progress)
                self.gate.succeeded()
                self.reachability.answered()
                return
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except ReceiptMismatch as exc:
                self.reachability.answered()
                self._refused(entry, grpc.StatusCode.ALREADY_EXISTS, str(exc))
                return
            if code in STORE_LEVEL:
                self.reachability.failed(entry.manifest.recording_id, code, details)
            else:
                self.reachability.answered()
            if code not in TRANSIENT:
                self._refused(entry, code, details)
                return
            if code in STORE_LEVEL:
                delay = self.gate.failed()
                attempt = self.gate.attempt
            elif backoff.attempt + 1 >= ENTRY_ATTEMPTS_PER_PASS:
                self._deferred(entry, code, details, progress)
                return
            else:
                attempt, delay = backoff.attempt + 1, backoff.next_delay()
            self._retry_log(entry, code, details, attempt, delay, progress)
            if code not in STORE_LEVEL:
                self.stop_event.wait(delay)

    def _open(self, recording_id: str) -> OutboxEntry | None:
        try:
            return self.outbox.open(recording_id)
        except FileNotFoundError:
            return None  # uploaded and removed by another pass
        except (OSError, ValueError) as exc:  # json_format.ParseError is a ValueError
            self._refused_path(self.outbox.root / recording_id, f"unreadable manifest: {exc}")
            return None

    def _upload_once(self, entry: OutboxEntry, progress: _Progress) -> None:
        rid = entry.manifest.recording_id
        progress.attempts += 1
        if DISCARDED in entry.manifest.flags:  # no audio: the store is told, and keeps a trace
            request = pb.DiscardRequest(manifest=entry.manifest)
            receipt = self.stub.Discard(request, timeout=QUERY_TIMEOUT_S)
            self._done(entry, receipt, progress, resumed_at=0)
            return
        status = self.stub.QueryUpload(
            pb.QueryUploadRequest(recording_id=rid), timeout=QUERY_TIMEOUT_S
        )
        if status.complete:
            progress.sent = 0
            self._done(entry, status.receipt, progress, resumed_at=entry.manifest.size)
            return
        offset = status.committed_size if status.committed_size <= entry.manifest.size else 0
        deadline = 60 + (entry.manifest.size - offset) / MIN_UPLOAD_RATE
        requests = progress.counted(upload_requests(entry, offset, self.config.chunk_bytes))
        receipt = self.stub.Upload(requests, timeout=deadline)
        self.bytes_sent += progress.sent
        self._done(entry, receipt, progress, resumed_at=offset)

    def _done(
        self, entry: OutboxEntry, receipt: pb.UploadReceipt, progress: _Progress, resumed_at: int
    ) -> None:
        try:
            self.outbox.remove(entry, receipt)
        except ValueError as exc:
            raise ReceiptMismatch(str(exc)) from None
        metrics.UPLOADS.labels("receipt_ok").inc()
        log.info(
            "recording_uploaded",
            recording_id=receipt.recording_id,
            bytes=receipt.size,
            sent=progress.sent,
            resumed_at=resumed_at,
            attempts=progress.attempts,
            sent_total=progress.sent_total,
            seconds=round(time.monotonic() - progress.started, 2),
            outcome="receipt_ok",
        )

    def _retry_log(
        self,
        entry: OutboxEntry,
        code: grpc.StatusCode,
        details: str,
        attempt: int,
        delay: float,
        progress: _Progress,
    ) -> None:
        # The store being down is told once by StoreReachability, not per attempt.
        level = logging.DEBUG if code in STORE_LEVEL else logging.WARNING
        metrics.UPLOADS.labels("retry").inc()
        log.log(
            level,
            "upload_retry",
            recording_id=entry.manifest.recording_id,
            code=code.name,
            reason=details[:200],
            attempt=attempt,
            retry_in_s=round(delay, 1),
            sent=progress.sent,
            sent_total=progress.sent_total,
        )

    def _deferred(
        self, entry: OutboxEntry, code: grpc.StatusCode, details: str, progress: _Progress
    ) -> None:
        metrics.UPLOADS.labels("deferred").inc()
        log.error(
            "upload_deferred",
            recording_id=entry.manifest.recording_id,
            code=code.name,
            reason=details[:200],
            attempts=progress.attempts,
            action="kept_in_outbox_retry_on_rescan",
        )

    def _refused(self, entry: OutboxEntry, code: grpc.StatusCode, details: str) -> None:
        rid = entry.manifest.recording_id
        metrics.UPLOADS.labels("refused").inc()
        moved = quarantine(
            entry.path, self.quarantine_dir, f"store refused upload: {code.name}: {details}"
        )
        log.error("upload_refused", recording_id=rid, code=code.name, reason=details, kept_in=moved)

    def _refused_path(self, path: Path, reason: str) -> None:
        moved = quarantine(path, self.quarantine_dir, reason)
        log.error("outbox_entry_quarantined", entry=path.name, reason=reason, kept_in=moved)


class ReceiptMismatch(Exception):
    """The store's receipt is not for our bytes: the entry is kept (quarantined)."""
