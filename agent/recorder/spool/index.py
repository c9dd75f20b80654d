"""The spool's durable index (SQLite under the agent's data dir): every file handled
(name digest, mtime, size → recording or quarantine entry), so a rescan passes over
it without reading it, and every recording taken (hashed call id, sha256 of its audio
samples, whether its owned source still waits to be deleted).

A PBX may put the customer's number in its file names, so names are kept only as a
keyed digest (``name_digest``, an HMAC under a key of this host's own); the plain names of an owned
recording's files are kept only until they are deleted.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from agent.privacy import KeyFileError

Stat = tuple[str, int, int]  # (name, mtime_ns, size)
TAKEN_KEEP_S = 400 * 86400.0  # dedup outlives the store's retention
HANDLED_KEEP_S = 86400.0  # a handled file that is gone from the spool


class SpoolIndex:
    """What was taken (for dedup and owned deletion) and which files were handled."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS handled (
        name TEXT NOT NULL, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL,
        ref TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (name, mtime_ns, size));
    CREATE TABLE IF NOT EXISTS taken (
        recording_id TEXT PRIMARY KEY, call_ref TEXT NOT NULL, sha256 TEXT NOT NULL,
        files TEXT NOT NULL, state TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS taken_sha ON taken (sha256);
    CREATE INDEX IF NOT EXISTS taken_call ON taken (call_ref);
    CREATE INDEX IF NOT EXISTS taken_state ON taken (state);
    """

    def __init__(self, path: Path, name_digest: Callable[[str], str]) -> None:
        self.name_digest = name_digest
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(self.SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _row(self, key: Stat) -> tuple[str, int, int]:
        return (self.name_digest(key[0]), key[1], key[2])

    def is_handled(self, key: Stat) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM handled WHERE name=? AND mtime_ns=? AND size=?", self._row(key)
        ).fetchone()
        return row is not None

    def mark(self, keys: Iterable[Stat], ref: str) -> None:
        with self.db:
            self._mark(keys, ref)

    def _mark(self, keys: Iterable[Stat], ref: str) -> None:
        now = time.time()
        self.db.executemany(
            "INSERT OR REPLACE INTO handled VALUES (?, ?, ?, ?, ?)",
            [(*self._row(k), ref, now) for k in keys],
        )

    def unmark(self, ref: str) -> int:
        """Forget the files handled as ``ref`` (a quarantine entry being retried), so
        a rescan looks at them again; how many."""
        with self.db:
            return self.db.execute("DELETE FROM handled WHERE ref=?", (ref,)).rowcount

    def find(self, sha256: str) -> str | None:
        """The recording already taken with these audio samples."""
        row = self.db.execute("SELECT recording_id FROM taken WHERE sha256=?", (sha256,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def same_call(self, call_ref: str) -> str | None:
        row = self.db.execute("SELECT recording_id FROM taken WHERE call_ref=?", (call_ref,))
        found = row.fetchone()
        return None if found is None else str(found[0])

    def take(self, rid: str, call_ref: str, sha256: str, keys: list[Stat], owned: bool) -> None:
        """Record a recording taken and its files handled, in one transaction."""
        files, state = (json.dumps(keys), "pending") if owned else ("[]", "kept")
        with self.db:
            self.db.execute(
                "INSERT INTO taken VALUES (?, ?, ?, ?, ?, ?)",
                (rid, call_ref, sha256, files, state, time.time()),
            )
            self._mark(keys, rid)

    def duplicate(self, rid: str, keys: list[Stat], owned: bool) -> None:
        """Files that held ``rid``'s audio again: handled; owned ones to be deleted with
        (or, if already released, after) that recording."""
        with self.db:
            self._mark(keys, rid)
            if not owned:
                return
            (files,) = self.db.execute(
                "SELECT files FROM taken WHERE recording_id=?", (rid,)
            ).fetchone()
            self.db.execute(
                "UPDATE taken SET files=?, state='pending' WHERE recording_id=?",
                (json.dumps([*json.loads(files), *keys]), rid),
            )

    def is_taken(self, rid: str) -> bool:
        row = self.db.execute("SELECT 1 FROM taken WHERE recording_id=?", (rid,))
        return row.fetchone() is not None

    def pending(self) -> list[tuple[str, list[Stat]]]:
        """Owned recordings whose source files are not deleted yet."""
        rows = self.db.execute("SELECT recording_id, files FROM taken WHERE state='pending'")
        return [(rid, [(n, m, s) for n, m, s in json.loads(files)]) for rid, files in rows]

    def settle(self, rid: str, state: str) -> None:
        """``released`` (deleted) or ``kept``: the plain file names are forgotten."""
        with self.db:
            self.db.execute(
                "UPDATE taken SET state=?, files='[]' WHERE recording_id=?", (state, rid)
            )

    def prune(self, present: Iterable[str]) -> None:
        """Forget what is old and gone from the spool (bounds the index's size)."""
        now = time.time()
        here = {self.name_digest(n) for n in present}
        with self.db:
            self.db.execute(
                "DELETE FROM taken WHERE at < ? AND state != 'pending'", (now - TAKEN_KEEP_S,)
            )
            old = self.db.execute(
                "SELECT DISTINCT name FROM handled WHERE at < ?", (now - HANDLED_KEEP_S,)
            )
            gone = [(n,) for (n,) in old.fetchall() if n not in here]
            self.db.executemany("DELETE FROM handled WHERE name=?", gone)


def index_key(path: Path) -> bytes:
    """This host's key for the spool index's file-name digests (a PBX may put numbers
    in file names): 32 random bytes made on first use, 0600, never leaving the host."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != 32:
            raise KeyFileError(f"{path}: expected 32 bytes (delete it to make a new one)") from None
        return key
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key
