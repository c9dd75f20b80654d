"""The agent's outbox and uplink metrics (prometheus_client, default registry).

The HTTP endpoint (``agent.metrics.serve``) exposes the default registry, so these
appear there without further wiring. They live in the agent's main process only.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
