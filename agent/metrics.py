"""Prometheus metrics over HTTP on a local port, for both daemons.

The agent's SIP workers are separate processes: they write their counters with
prometheus_client's multiprocess mode into a directory the agent gives them
(``PROMETHEUS_MULTIPROC_DIR``); the agent's endpoint serves its own metrics together
with the workers' sums.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from agent import logs

log = logs.get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def reset_multiprocess_dir(path: Path) -> None:
    """Workers' metric files from an earlier run describe dead processes: start empty."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)


def worker_exited(path: Path, pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: they are history)."""
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


def serve(listen: str, workers_dir: Path | None = None) -> int:
    """Serve /metrics on ``host:port`` (port 0 picks one); returns the bound port."""
    host, _, port = listen.rpartition(":")
    registry: CollectorRegistry = REGISTRY
    if workers_dir is not None:
        registry = CollectorRegistry()
        registry.register(_Chain(REGISTRY))
        multiprocess.MultiProcessCollector(registry, path=str(workers_dir))  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(int(port), host.strip("[]"), registry=registry)
    bound = int(server.server_port)
    log.info("metrics_listening", address=f"{host}:{bound}")
    return bound


class _Chain:
    """Collects another registry's metrics (the main process's own)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):  # type: ignore[no-untyped-def]
        return self.registry.collect()


# ---------------------------------------------------------------- the agent's main process

RECORDINGS_FINALIZED = Counter(
    "callrec_recordings_finalized_total", "Recordings finalized into the outbox", ["source"]
)
RECORDING_FLAGS = Counter(
    "callrec_recording_flags_total", "Finalized recordings carrying each flag", ["flag"]
)
QUARANTINED = Counter(
    "callrec_quarantined_total", "Entries moved to quarantine, by stage", ["stage"]
)
FINALIZE_SECONDS = Histogram(
    "callrec_finalize_seconds", "Time to merge, encode and hash one recording"
)

# Outbox and uplink (the main process; gauges also valid in multiprocess mode).

OUTBOX_ENTRIES = Gauge(
    "callrec_outbox_entries",
    "Recordings in the outbox waiting for the store's receipt",
    multiprocess_mode="livemax",
)
OUTBOX_BYTES = Gauge(
    "callrec_outbox_bytes",
    "Bytes in the outbox waiting for the store's receipt",
    multiprocess_mode="livemax",
)
OUTBOX_OLDEST_SECONDS = Gauge(
    "callrec_outbox_oldest_seconds",
    "Age of the oldest recording in the outbox (0 when empty)",
    multiprocess_mode="livemax",
)
OUTBOX_OVER_LIMIT = Gauge(
    "callrec_outbox_over_limit",
    "1 while the outbox is past [uplink] outbox_warn_bytes or outbox_warn_age",
    multiprocess_mode="livemax",
)
UPLOADS = Counter(
    "callrec_uploads_total",
    "Upload attempts that ended, by outcome (receipt_ok, retry, deferred, refused)",
    ["outcome"],
)
UPLOAD_BYTES_SENT = Counter(
    "callrec_upload_bytes_sent_total", "Audio bytes put on the wire to the store"
)


# ---------------------------------------------------------------- SIP workers (multiprocess)

CALLS_ACTIVE = Gauge(
    "callrec_calls_active", "Calls being recorded now", multiprocess_mode="livesum"
)
CALLS_ANSWERED = Counter("callrec_calls_answered_total", "Calls answered and recorded", ["source"])
CALLS_REFUSED = Counter("callrec_calls_refused_total", "INVITEs refused, by SIP status", ["status"])
CALLS_ENDED = Counter("callrec_calls_ended_total", "Recorded calls that ended, by how", ["reason"])
RTP_PACKETS_RECEIVED = Counter(
    "callrec_rtp_packets_received_total", "RTP packets received on recorded streams", ["party"]
)
RTP_PACKETS_LOST = Counter(
    "callrec_rtp_packets_lost_total", "RTP packets lost on recorded streams", ["party"]
)
DISK_FREE_BYTES = Gauge(
    "callrec_disk_free_bytes",
    "Free bytes on the agent's data disk, as the SIP workers last saw them",
    multiprocess_mode="livemin",
)
DISK_FULL_REFUSALS = Counter(
    "callrec_disk_full_refusals_total",
    "New calls refused (503) because the data disk was below [agent] min_free",
)
