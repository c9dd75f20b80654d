"""Finalize: a finished capture becomes a recording in the outbox.

captures/ready/<id>/ (mono legs + capture.json, already privacy-safe)
  → stereo (customer left, employee right), archival encoding, sha256, flags
  → outbox/.tmp-<id>/ (audio + manifest.json, fsynced)
  → outbox/<id>/ with one rename; only then are the raw legs deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path

from google.protobuf import json_format

from agent import audio, logs, metrics
from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    CaptureMeta,
    Flag,
    fsync_dir,
    parse_iso,
    read_meta,
)
from agent.config import AgentConfig
from agent.manifest import AUDIO_FORMATS, manifest_from_capture

log = logs.get_logger(__name__)

MANIFEST_FILE = "manifest.json"
LENGTH_MISMATCH_MS = 1000


def audio_file_name(audio_format: str) -> str:
    return "audio." + AUDIO_FORMATS[audio_format]


def quarantine(entry: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move an entry we cannot process aside, with the reason beside it; nothing is lost."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / entry.name
    suffix = 1
    while target.exists():
        target = quarantine_dir / f"{entry.name}.{suffix}"
        suffix += 1
    entry.rename(target)
    (target.parent / f"{target.name}.reason").write_text(reason + "\n")
    return target


FINALIZE_NICE = 10


def _below_recording() -> None:
    """Run this finalize thread, and the encoder it starts, at a lower CPU priority
    than the SIP workers: on a saturated host calls keep their audio and finalize
    waits (Linux nice values are per thread and inherited by child processes)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FINALIZE_NICE)


class Finalizer:
    def __init__(self, config: AgentConfig, region: str = "fi") -> None:
        self.config = config
        self.region = region
        self.ready_dir = config.captures_dir / "ready"
        self.outbox_dir = config.outbox_dir

    def handle(self, recording_id: str) -> None:
        _below_recording()
        capture = self.ready_dir / recording_id
        target = self.outbox_dir / recording_id
        if target.exists():
            # Finalized before a crash that came between the rename and the clean-up.
            shutil.rmtree(capture)
            return
        try:
            meta = read_meta(capture)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            moved = quarantine(
                capture, self.config.quarantine_dir, f"unreadable capture.json: {exc}"
            )
            metrics.QUARANTINED.labels("finalize").inc()
            log.error("capture_quarantined", entry=recording_id, reason=str(exc), path=moved)
            return
        try:
            with metrics.FINALIZE_SECONDS.time():
                self._finalize(capture, meta, target)
        except Exception as exc:  # noqa: BLE001 - any failure quarantines, never loses
            moved = quarantine(capture, self.config.quarantine_dir, f"finalize failed: {exc!r}")
            metrics.QUARANTINED.labels("finalize").inc()
            log.error(
                "capture_quarantined",
                recording_id=recording_id,
                reason=logs.error_text(exc),
                path=moved,
            )

    def _finalize(self, capture: Path, meta: CaptureMeta, target: Path) -> None:
        cfg = self.config
        staging = self.outbox_dir / f".tmp-{meta.recording_id}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        legs = [capture / leg for leg in meta.legs if (capture / leg).exists()]
        if not legs:
            raise ValueError("no audio legs in capture")
        encoded = audio.encode(
            legs, staging / audio_file_name(cfg.audio.format), cfg.audio.format, cfg.audio.bitrate
        )
        meta = meta.with_flags(*_audio_flags(meta, encoded))
        manifest = manifest_from_capture(
            meta, cfg.audio.format, encoded.channels, encoded.size, encoded.sha256, self.region
        )
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json_format.MessageToJson(manifest, indent=1))
        for path in (encoded.path, manifest_path):
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        staging.rename(target)
        fsync_dir(self.outbox_dir)
        shutil.rmtree(capture)
        metrics.RECORDINGS_FINALIZED.labels(meta.source).inc()
        for flag in meta.flags:
            metrics.RECORDING_FLAGS.labels(flag.value).inc()
        duration = parse_iso(meta.ended_at or meta.started_at) - parse_iso(meta.started_at)
        log.info(
            "recording_finalized",
            recording_id=meta.recording_id,
            customer=meta.customer.masked,
            employee=meta.employees[0].name if meta.employees else "unknown",
            direction=meta.direction.value,
            duration_s=round(duration.total_seconds(), 1),
            audio_s=round(encoded.duration_ms / 1000, 1),
            bytes=encoded.size,
            format=cfg.audio.format,
            flags=",".join(meta.flags) or "-",
        )


def _audio_flags(meta: CaptureMeta, encoded: audio.EncodedAudio) -> list[Flag]:
    flags: list[Flag] = []
    if encoded.length_mismatch_ms > LENGTH_MISMATCH_MS:
        flags.append(Flag.LENGTH_MISMATCH)
    if encoded.channels == 2 and meta.legs == (CUSTOMER_LEG, EMPLOYEE_LEG):
        if 0 in encoded.silent_channels:
            flags.append(Flag.SILENT_CUSTOMER)
        if 1 in encoded.silent_channels:
            flags.append(Flag.SILENT_EMPLOYEE)
    return flags
