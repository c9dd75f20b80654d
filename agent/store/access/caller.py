"""Who is asking the Access service and for what: the directory of people (re-read
when its file changes), the caller a request's credentials name, the attempt as the
audit log tells it, and the grant the gate hands an allowed request."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from agent import logs
from agent.directory import Directory, DirectoryError, Person
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.store.access.rules import Operation, Purpose
from agent.store.audit import chain as audit
from agent.store.catalog import RecordingRow

log = logs.get_logger(__name__)

PURPOSES = {
    apb.PURPOSE_VERIFICATION: Purpose.VERIFICATION,
    apb.PURPOSE_LEGAL: Purpose.LEGAL,
    apb.PURPOSE_TRAINING: Purpose.TRAINING,
    apb.PURPOSE_SECURITY: Purpose.SECURITY,
}


class DirectoryFile:
    """The directory, re-read whenever the file changes (checked on every request).
    A file that cannot be read fails closed: nobody gets anything until it is fixed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._directory = self._load()

    def _load(self) -> Directory:
        stat = os.stat(self.path)
        directory = Directory.load(self.path)
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        return directory

    def current(self) -> Directory:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise DirectoryError(f"{self.path}: directory file not found") from None
        with self._lock:
            if (stat.st_mtime_ns, stat.st_size, stat.st_ino) != self._stamp:
                self._stamp = None
                self._directory = self._load()
                log.info("access_directory_reloaded", people=len(self._directory.people))
            return self._directory


@dataclass(frozen=True)
class Caller:
    actor: str  # "person:<id>", "token:<id>" or "anonymous"
    person: Person | None
    problem: str = ""
    channel: str = "cli"  # "web" for the web's OIDC ID tokens, "cli" for personal tokens


@dataclass(frozen=True)
class Attempt:
    """What the audit log says about a request, as far as it is known."""

    actor: str
    op: Operation
    recording_id: str | None
    purpose: str = ""
    reason: str = ""
    channel: str = "cli"
    role: str = "unknown"  # the person's role, once known (for the metrics)

    def event(self, outcome: str, detail: str = "") -> audit.Event:
        detail = f"channel={self.channel} {detail}".strip()
        return audit.Event(
            self.actor, self.op.value, self.recording_id, self.reason, outcome, self.purpose,
            detail,
        )  # fmt: skip


@dataclass(frozen=True)
class Grant:
    attempt: Attempt
    person: Person
    purpose: Purpose
    row: RecordingRow | None
    directory: Directory

    @property
    def actor(self) -> str:
        return self.attempt.actor

    def event(self, recording_id: str | None, detail: str = "") -> audit.Event:
        """The "allowed" event of this request (about ``recording_id``)."""
        return replace(self.attempt, recording_id=recording_id).event("allowed", detail)

    @property
    def recording(self) -> RecordingRow:
        """The recording the gate was asked about (it checked that it exists)."""
        if self.row is None:
            raise AssertionError("the gate was given a recording id")
        return self.row
