"""Partial uploads: the resumable state of an upload between streams.

Kept on the receiving store's disk, in ``incoming/``: ``<id>.manifest`` (the upload's
manifest, written once when the upload begins: its mtime is the upload's age) beside
``<id>.part`` (the bytes received so far, fsynced every few MB and when a stream ends
without its finish). The functions below are the whole interface the Ingest service
uses — the committed size for QueryUpload, the size an upload of the same recording can
resume from, opening, appending, closing — so that a later change can keep this state
where every store replica sees it (issue 18: S3 multipart parts listed on resume, or
the catalog) by providing the same operations. The sweeper removes partial uploads by
age (``sweeper.remove_stale_uploads``); the per-site bounds are ``upload_limits``.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf.message import DecodeError

from agent.capture import fsync_dir
from agent.pb.callrec.v1 import recordings_pb2 as pb


def same_upload(manifest: pb.Manifest, manifest_file: Path) -> bool:
    try:
        previous = pb.Manifest.FromString(manifest_file.read_bytes())
    except (FileNotFoundError, DecodeError):
        return False
    return (previous.sha256, previous.size, previous.site) == (
        manifest.sha256,
        manifest.size,
        manifest.site,
    )


def resumable_size(manifest: pb.Manifest, part: Path, manifest_file: Path) -> int:
    """Bytes of an earlier stream of the same recording we can build on (else 0)."""
    if not same_upload(manifest, manifest_file):
        return 0
    try:
        return min(part.stat().st_size, manifest.size)
    except FileNotFoundError:
        return 0


def committed_size(part: Path, manifest_file: Path, site: str | None) -> int:
    """QueryUpload's committed size; another site's partial upload counts as nothing."""
    if site is not None:
        try:
            if pb.Manifest.FromString(manifest_file.read_bytes()).site != site:
                return 0
        except (FileNotFoundError, DecodeError):
            return 0
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def open_part(manifest: pb.Manifest, part: Path, manifest_file: Path, committed: int) -> int:
    """Open ``<id>.part`` for appending at ``committed``; a new upload (committed 0)
    first writes its manifest durably and starts the part empty."""
    if committed == 0:
        tmp = manifest_file.with_suffix(".manifest.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            append(fd, manifest.SerializeToString(deterministic=True), sync=True)
        finally:
            os.close(fd)
        tmp.replace(manifest_file)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    else:
        flags = os.O_WRONLY | os.O_APPEND
    fd = os.open(part, flags, 0o600)
    if committed == 0:
        fsync_dir(part.parent)
    return fd


def append(fd: int, data: bytes, sync: bool) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if sync:
        os.fsync(fd)


def close_part(fd: int, sync: bool) -> None:
    """Close the part; a stream that ended without finish first makes what arrived
    durable, so the committed size QueryUpload reports survives a crash."""
    try:
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
