"""The one line ``systemctl status`` shows for the agent (sd_notify ``STATUS=``)."""

from __future__ import annotations

from agent.recorder.uplink.backpressure import OutboxLevel
from agent.sdnotify import human_bytes

# How often the agent sends it: often enough to read as "now", rare enough to be free.
STATUS_INTERVAL_S = 5.0


def agent_status(
    workers_up: int, workers: int, calls: int, outbox: OutboxLevel, quarantined: int
) -> str:
    """e.g. ``workers 4/4 up, 3 calls, outbox 2 (1.2 MB), oldest 40s``."""
    parts = [
        f"workers {workers_up}/{workers} up",
        f"{calls} call{'' if calls == 1 else 's'}",
        f"outbox {outbox.entries} ({human_bytes(outbox.bytes)})",
    ]
    if outbox.entries:
        parts.append(f"oldest {outbox.oldest_s:.0f}s")
    if outbox.over:
        parts.append("OVER " + "+".join(outbox.over) + " limit")
    if quarantined:
        parts.append(f"quarantine {quarantined}")
    return ", ".join(parts)
