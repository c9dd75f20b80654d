"""Owned spool sources (``[spool] owned = true``): a recording's sidecar and audio
are deleted once finalize has put it into ``outbox/<id>`` (or the store already
acknowledged it), and only if they are unchanged since they were taken; a recording
finalize or the uplink quarantined keeps its source files."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from agent import logs
from agent.config import AgentConfig
from agent.recorder.spool.files import lstat_or_none, stat_key
from agent.recorder.spool.index import SpoolIndex, Stat

log = logs.get_logger(__name__)

Pending = tuple[str, list[Stat]]  # a recording id and the source files taken for it


def release_owned(
    pending: list[Pending], index: SpoolIndex, root: Path, config: AgentConfig
) -> list[Pending]:
    """Release what is safe (or kept), settle it in the index; what still waits."""
    still: list[Pending] = []
    for rid, keys in pending:
        state = recording_state(config, rid)
        if state == "wait":
            still.append((rid, keys))
            continue
        if state == "kept":
            log.warning("spool_source_kept", recording_id=rid, reason="finalize_quarantined")
        else:
            deleted = delete_source(root, keys)
            log.info("spool_released", recording_id=rid, deleted=deleted)
        index.settle(rid, "released" if state == "safe" else "kept")
    return still


def recording_state(config: AgentConfig, rid: str) -> str:
    """safe: in the outbox or already acknowledged; wait: not finalized; kept:
    finalize or the uplink quarantined it."""
    if (config.outbox_dir / rid).is_dir():
        return "safe"
    if (config.captures_dir / "ready" / rid).exists():
        return "wait"
    quarantine = config.quarantine_dir
    if (quarantine / rid).exists() or any(quarantine.glob(f"{rid}.*")):
        return "kept"
    return "safe"


def delete_source(root: Path, keys: list[Stat]) -> int:
    """Delete the files we took, audio first, the sidecar last; a file changed since
    (a new recording under the same name) is left alone."""
    deleted = 0
    for key in [*keys[1:], keys[0]]:
        st = lstat_or_none(root / key[0])
        if st is None or stat_key(key[0], st) != key:
            continue
        with suppress(FileNotFoundError):
            (root / key[0]).unlink()
            deleted += 1
    return deleted
