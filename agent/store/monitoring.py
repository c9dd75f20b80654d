"""The store's Prometheus figures: ingest and access counters (counted where they
happen), and what the catalog says (retention, audit head, keys) measured at scrape.

Retention is the register's legal promise, so its figures come from the catalog
itself, not from the sweeper's memory: whichever scheduler sweeps (the store's loop
or the timer's ``callrec sweep --once``), a recording left past its retention shows
here. The last successful sweep is read from ``<data_dir>/sweep-state.json``, which
every sweep (loop or timer) writes when it ends without a failure.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent import logs
from agent.config import StoreConfig
from agent.sdnotify import human_bytes
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, data_keys, recordings
from agent.store.keys.master import KeyWrapper
from agent.store.retention.schedule import datetime_to_ms, expires_at_ms
from agent.store.retention.sweeper import expired_clause, read_sweep_state, utc_now

log = logs.get_logger(__name__)

# The catalog's figures cost a few indexed queries and one pass over data_keys: kept
# for this long, however often Prometheus scrapes.
CATALOG_CACHE_S = 60.0

UPLOADS_STORED = Counter(
    "callrec_ingest_uploads_stored_total", "Uploads stored with a durable receipt sent"
)
BYTES_STORED = Counter("callrec_ingest_bytes_stored_total", "Audio bytes of the uploads stored")
UPLOADS_REFUSED = Counter(
    "callrec_ingest_refused_total", "Uploads refused, by gRPC status code", ["code"]
)
UPLOADS_IN_PROGRESS = Gauge("callrec_ingest_uploads_in_progress", "Upload streams open now")
ACCESS_REQUESTS = Counter(
    "callrec_access_requests_total",
    "Access decisions by role, operation and outcome (allowed by the rules; denied, "
    "unauthenticated, not_found, unavailable, refused); a request the rules allow "
    "that is then refused (a held recording to erase) counts once each",
    ["role", "operation", "outcome"],
)


@dataclass(frozen=True)
class CatalogFigures:
    past_retention: int
    most_overdue_s: float
    oldest_age_s: float
    held_past_retention: int
    audit_seq: int
    data_keys: dict[str, int]


def measure_catalog(catalog: Catalog, retention_months: int) -> CatalogFigures:
    now_ms = datetime_to_ms(utc_now())
    live = recordings.c.destroy_reason.is_(None)
    unheld = recordings.c.legal_hold.is_(sa.false())
    expired = expired_clause(now_ms, retention_months)
    ended = recordings.c.ended_at_ms
    with catalog.engine.connect() as conn:
        past, first_expired = conn.execute(
            sa.select(sa.func.count(), sa.func.min(ended)).where(live, unheld, expired)
        ).one()
        oldest = conn.execute(sa.select(sa.func.min(ended)).where(live, unheld)).scalar_one()
        held = conn.execute(
            sa.select(sa.func.count()).where(live, recordings.c.legal_hold.is_(sa.true()), expired)
        ).scalar_one()
        seq = conn.execute(sa.select(audit.audit_head.c.seq)).scalar()
        keys = conn.execute(
            sa.select(data_keys.c.key_id, sa.func.count())
            .where(data_keys.c.wrapped_key.is_not(None))
            .group_by(data_keys.c.key_id)
        ).all()
    overdue = 0.0
    if first_expired is not None:
        overdue = max(0.0, (now_ms - expires_at_ms(first_expired, retention_months)) / 1000)
    return CatalogFigures(
        past_retention=int(past),
        most_overdue_s=overdue,
        oldest_age_s=0.0 if oldest is None else max(0.0, (now_ms - oldest) / 1000),
        held_past_retention=int(held),
        audit_seq=int(seq or 0),
        data_keys={str(key_id): int(count) for key_id, count in keys},
    )


class StoreCollector(Collector):
    """The catalog's figures (cached ``CATALOG_CACHE_S``), the last successful sweep
    and the sweep schedule, measured when Prometheus asks."""

    def __init__(
        self,
        catalog: Catalog,
        wrapper: KeyWrapper,
        data_dir: Path,
        retention_months: int,
        sweep_interval_s: float,
    ) -> None:
        self.catalog = catalog
        self.wrapper = wrapper
        self.data_dir = data_dir
        self.retention_months = retention_months
        self.sweep_interval_s = sweep_interval_s
        self._lock = threading.Lock()
        self._cached: tuple[float, CatalogFigures] | None = None

    def figures(self) -> CatalogFigures | None:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CATALOG_CACHE_S:
                try:
                    figures = measure_catalog(self.catalog, self.retention_months)
                except sa.exc.SQLAlchemyError as exc:
                    log.warning("metrics_catalog_unavailable", error=str(exc))
                    return None
                self._cached = (time.monotonic(), figures)
            return self._cached[1]

    def collect(self) -> Iterator[Metric]:
        yield from self._schedule()
        figures = self.figures()
        if figures is None:
            return
        yield _gauge(
            "callrec_store_recordings_past_retention",
            "Recordings past their retention, not on hold, still in the catalog",
            figures.past_retention,
        )
        yield _gauge(
            "callrec_store_past_retention_max_seconds",
            "How long the most overdue of them has been past its retention (0: none)",
            figures.most_overdue_s,
        )
        yield _gauge(
            "callrec_store_oldest_recording_age_seconds",
            "Age since the call ended of the oldest recording not on hold",
            figures.oldest_age_s,
        )
        yield _gauge(
            "callrec_store_held_past_retention",
            "Recordings past their retention kept by a legal hold",
            figures.held_past_retention,
        )
        yield _gauge(
            "callrec_store_audit_head_seq",
            "Sequence number of the newest audit event (the chain's head)",
            figures.audit_seq,
        )
        keys = GaugeMetricFamily(
            "callrec_store_data_keys",
            "Recordings' data keys wrapped by each master key (a retired key has none)",
            labels=["key_id"],
        )
        for key_id, count in sorted(figures.data_keys.items()):
            keys.add_metric([key_id], count)
        yield keys

    def _schedule(self) -> Iterator[Metric]:
        yield _gauge(
            "callrec_store_retention_seconds",
            "The retention period (calendar months, as 30.44-day months)",
            self.retention_months * 30.44 * 86400,
        )
        yield _gauge(
            "callrec_sweeper_interval_seconds",
            "How often the authoritative scheduler sweeps ([store] sweep_interval; "
            "86400 when the daily timer does)",
            self.sweep_interval_s or 86400.0,
        )
        last = read_sweep_state(self.data_dir)
        if last is not None:
            yield _gauge(
                "callrec_sweeper_last_success_timestamp_seconds",
                "When the last sweep without a failure ended (store loop or timer)",
                last,
            )
        masters = GaugeMetricFamily(
            "callrec_store_master_keys",
            "Master keys loaded; current=1 for the one wrapping new data keys",
            labels=["key_id", "current"],
        )
        current = self.wrapper.current_key_id
        for key_id in sorted(self.wrapper.key_ids()):
            masters.add_metric([key_id, "1" if key_id == current else "0"], 1)
        yield masters

    def describe(self) -> Iterable[Metric]:
        return []


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def store_status(config: StoreConfig) -> str:
    """The store's ``STATUS=`` line, e.g. ``uploads 12 stored (3.4 MB), 1 in progress,
    0 refused; last sweep 2026-12-02 03:00 UTC by store``."""
    stored = _sample("callrec_ingest_uploads_stored_total")
    size = _sample("callrec_ingest_bytes_stored_total")
    active = _sample("callrec_ingest_uploads_in_progress")
    refused = sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "callrec_ingest_refused"
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    last = read_sweep_state(config.data_dir)
    when = (
        "never"
        if last is None
        else dt.datetime.fromtimestamp(last, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    )
    return (
        f"uploads {stored:.0f} stored ({human_bytes(size)}), {active:.0f} in progress, "
        f"{refused:.0f} refused; last sweep {when} by {config.sweep_by}"
    )


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0
