"""Prometheus metrics over HTTP on a local port, for both daemons.

The agent's SIP workers are separate processes: they write their metrics with
prometheus_client's multiprocess mode into a directory the agent gives them
(``PROMETHEUS_MULTIPROC_DIR``). Every process imports this module, so every process
holds every metric object; each family has one owner, though: ``WORKER_FAMILIES``
come from the workers' files (summed), every other family from the main process's
registry. ``serve`` takes each family from its owner only, so a scrape shows each
family once (the workers' files also hold zeros of the main process's gauges, and
the main process holds zeros of the workers' counters).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from cryptography import x509
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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


def serve(
    listen: str,
    workers_dir: Path | None = None,
    extra: Iterable[Collector] = (),
    exclude: frozenset[str] = frozenset(),
) -> int:
    """Serve /metrics on ``host:port`` (port 0 picks one); returns the bound port.

    With ``workers_dir`` the workers' families come from their files and only from
    there; ``extra`` collectors (measured at each scrape) are added to the page;
    ``exclude`` names families of this process's registry that are not its own (the
    store imports this module, but the agent's families are not the store's).
    """
    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry()
    if workers_dir is None:
        registry.register(_Only(REGISTRY, keep=lambda name: name not in exclude))
    else:
        own = WORKER_FAMILIES | exclude
        registry.register(_Only(REGISTRY, keep=lambda name: name not in own))
        registry.register(_Workers(workers_dir))
    for collector in extra:
        registry.register(collector)
    server, _thread = start_http_server(int(port), host.strip("[]"), registry=registry)
    bound = int(server.server_port)
    log.info("metrics_listening", address=f"{host}:{bound}")
    return bound


class _Only(Collector):
    """The families of another collector whose name ``keep`` accepts."""

    def __init__(self, source: Collector, keep: Callable[[str], bool]) -> None:
        self.source = source
        self.keep = keep

    def collect(self) -> Iterable[Metric]:
        return [family for family in self.source.collect() if self.keep(family.name)]

    def describe(self) -> Iterable[Metric]:
        return []


class _Workers(Collector):
    """The workers' families, summed from their files; a family no worker has written
    yet (a labelled counter before its first event) is still declared, empty."""

    def __init__(self, workers_dir: Path) -> None:
        self.files = multiprocess.MultiProcessCollector(None, path=str(workers_dir))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        found = [f for f in self.files.collect() if f.name in WORKER_FAMILIES]  # type: ignore[no-untyped-call]
        seen = {f.name for f in found}
        for family in REGISTRY.collect():
            if family.name in WORKER_FAMILIES and family.name not in seen:
                found.append(Metric(family.name, family.documentation, family.type, family.unit))
        return found

    def describe(self) -> Iterable[Metric]:
        return []


class CertificateExpiry(Collector):
    """``callrec_tls_certificate_not_after_timestamp_seconds{role}``: read at each
    scrape, so a renewed file shows at once (a file that can't be read is left out)."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self.files = dict(files)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "callrec_tls_certificate_not_after_timestamp_seconds",
            "When each TLS certificate this daemon uses stops being valid (Unix time)",
            labels=["role"],
        )
        for role, path in sorted(self.files.items()):
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            family.add_metric([role], cert.not_valid_after_utc.timestamp())
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


class DiskSpace(Collector):
    """Free and total bytes of the file system holding the daemon's data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def collect(self) -> Iterator[Metric]:
        free = GaugeMetricFamily(
            "callrec_data_dir_free_bytes",
            "Bytes free (for the daemon's user) on the data directory's file system",
        )
        size = GaugeMetricFamily(
            "callrec_data_dir_size_bytes", "Size of the data directory's file system"
        )
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return
        free.add_metric([], st.f_bavail * st.f_frsize)
        size.add_metric([], st.f_blocks * st.f_frsize)
        yield free
        yield size

    def describe(self) -> Iterable[Metric]:
        return []


def quarantined(quarantine_dir: Path) -> int:
    """Entries set aside in quarantine/ (each has a ``<name>.reason`` file beside it)."""
    try:
        names = os.listdir(quarantine_dir)
    except FileNotFoundError:
        return 0
    return sum(1 for name in names if not name.endswith(".reason") and not name.startswith("."))


class Quarantine(Collector):
    """``callrec_quarantine_entries``: counted at each scrape."""

    def __init__(self, quarantine_dir: Path) -> None:
        self.quarantine_dir = quarantine_dir

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "callrec_quarantine_entries",
            "Recordings set aside in quarantine/ that need an operator",
        )
        family.add_metric([], quarantined(self.quarantine_dir))
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


def calls_active(workers_dir: Path) -> int:
    """Calls being recorded now, summed over the workers' files."""
    collector = multiprocess.MultiProcessCollector(None, path=str(workers_dir))  # type: ignore[no-untyped-call]
    for family in collector.collect():  # type: ignore[no-untyped-call]
        if family.name == "callrec_calls_active":
            return int(sum(sample.value for sample in family.samples))
    return 0


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

# Outbox and uplink (the main process).

OUTBOX_ENTRIES = Gauge(
    "callrec_outbox_entries", "Recordings in the outbox waiting for the store's receipt"
)
OUTBOX_BYTES = Gauge("callrec_outbox_bytes", "Bytes in the outbox waiting for the store's receipt")
OUTBOX_OLDEST_SECONDS = Gauge(
    "callrec_outbox_oldest_seconds", "Age of the oldest recording in the outbox (0 when empty)"
)
OUTBOX_OVER_LIMIT = Gauge(
    "callrec_outbox_over_limit",
    "1 while the outbox is past [uplink] outbox_warn_bytes or outbox_warn_age",
)
WORKERS_CONFIGURED = Gauge("callrec_workers_configured", "SIP worker processes configured")
WORKERS_UP = Gauge("callrec_workers_up", "SIP worker processes running now")
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
# The SIP front's refusals (not allowed, too large, no worker free), counted by the agent
# from the front's log lines: the main process's own family, beside the workers'.
FRONT_REFUSED = Counter(
    "callrec_front_refused_total", "INVITEs the SIP front refused, by SIP status", ["status"]
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

# The families only the workers write (their files are summed); every other family is
# the main process's own.
WORKER_FAMILIES = frozenset(
    {
        "callrec_calls_active",
        "callrec_calls_answered",
        "callrec_calls_refused",
        "callrec_calls_ended",
        "callrec_rtp_packets_received",
        "callrec_rtp_packets_lost",
        "callrec_disk_free_bytes",
        "callrec_disk_full_refusals",
    }
)

# Every family of the agent (main process and workers): the store leaves them out.
AGENT_FAMILIES = WORKER_FAMILIES | frozenset(
    family.name
    for metric in (
        RECORDINGS_FINALIZED,
        RECORDING_FLAGS,
        QUARANTINED,
        FINALIZE_SECONDS,
        OUTBOX_ENTRIES,
        OUTBOX_BYTES,
        OUTBOX_OLDEST_SECONDS,
        OUTBOX_OVER_LIMIT,
        WORKERS_CONFIGURED,
        WORKERS_UP,
        UPLOADS,
        UPLOAD_BYTES_SENT,
        FRONT_REFUSED,
    )
    for family in metric.describe()
)
