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
    NO_SPACE,
    CaptureMeta,
    Flag,
    fsync_dir,
    leg_seconds,
    parse_iso,
    quarantine,
    read_meta,
)
from agent.config import AgentConfig
from agent.manifest import AUDIO_FORMATS, discard_manifest_from_capture, manifest_from_capture

log = logs.get_logger(__name__)

MANIFEST_FILE = "manifest.json"
LENGTH_MISMATCH_MS = 1000


def audio_file_name(audio_format: str) -> str:
    return "audio." + AUDIO_FORMATS[audio_format]


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
            if self._out_of_space(exc, capture):
                # A full disk is not the capture's fault: it stays in ready/ and the next
                # rescan tries again once there is room (nothing is quarantined for it).
                shutil.rmtree(self.outbox_dir / f".tmp-{meta.recording_id}", ignore_errors=True)
                log.warning("finalize_deferred", recording_id=recording_id, reason="disk_full")
                return
            moved = quarantine(capture, self.config.quarantine_dir, f"finalize failed: {exc!r}")
            metrics.QUARANTINED.labels("finalize").inc()
            log.error(
                "capture_quarantined",
                recording_id=recording_id,
                reason=logs.error_text(exc),
                path=moved,
            )

    def _finalize_discarded(
        self, capture: Path, meta: CaptureMeta, staging: Path, target: Path
    ) -> None:
        """A call stopped and discarded: its outbox entry is the manifest alone (the
        uplink tells the store, which keeps a catalog entry without audio); any leg
        left in the capture is deleted with it."""
        manifest = discard_manifest_from_capture(meta, self.region)
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json_format.MessageToJson(manifest, indent=1))
        with manifest_path.open("rb") as fh:
            os.fsync(fh.fileno())
        _publish(staging, target, self.outbox_dir, capture)
        log.info("recording_finalized", recording_id=meta.recording_id, flags="discarded")

    def _out_of_space(self, exc: Exception, capture: Path) -> bool:
        """The failure was the disk's: ENOSPC, or (the encoder's error says less) less
        room left than twice the capture's size."""
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        try:
            size = sum(p.stat().st_size for p in capture.iterdir())
            stat = os.statvfs(self.outbox_dir)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < 2 * size + 1024**2

    def _finalize(self, capture: Path, meta: CaptureMeta, target: Path) -> None:
        cfg = self.config
        staging = self.outbox_dir / f".tmp-{meta.recording_id}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if Flag.DISCARDED in meta.flags:
            self._finalize_discarded(capture, meta, staging, target)
            return
        legs = [capture / leg for leg in meta.legs if (capture / leg).exists()]
        if not legs:
            raise ValueError("no audio legs in capture")
        encoded = audio.encode(
            legs, staging / audio_file_name(cfg.audio.format), cfg.audio.format, cfg.audio.bitrate
        )
        _check_length(legs, encoded)
        meta = meta.with_flags(*_audio_flags(meta, encoded))
        manifest = manifest_from_capture(
            meta, cfg.audio.format, encoded.channels, encoded.size, encoded.sha256, self.region
        )
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json_format.MessageToJson(manifest, indent=1))
        for path in (encoded.path, manifest_path):
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        _publish(staging, target, self.outbox_dir, capture)
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


def _publish(staging: Path, target: Path, outbox_dir: Path, capture: Path) -> None:
    """The staged entry into the outbox with one rename; then the capture goes."""
    fsync_dir(staging)
    staging.rename(target)
    fsync_dir(outbox_dir)
    shutil.rmtree(capture)


def _check_length(legs: list[Path], encoded: audio.EncodedAudio) -> None:
    """The archive holds all the audio on disk: a leg whose header understates its data
    would otherwise be encoded short, and the capture deleted, without a word."""
    on_disk = max((leg_seconds(leg) or 0.0) for leg in legs)
    if encoded.duration_ms < on_disk * 1000 - LENGTH_MISMATCH_MS:
        raise ValueError(
            f"encoded {encoded.duration_ms / 1000:.1f} s of audio from legs of {on_disk:.1f} s"
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
