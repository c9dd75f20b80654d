"""The agent's quarantine (``<data_dir>/quarantine``): what finalize, the uplink, capture
recovery or the spool pickup could not process, each entry with ``<entry>.reason`` beside
it. Listed, retried, purged by the operator (``callrec quarantine``) and expired by the
agent after ``[agent] quarantine_max_age``: these are recordings of people, and they must
not outlive the retention on an agent host.

Stages, told from an entry's content:
- ``capture``: a capture directory (``capture.json``; finalize or recovery put it here);
  a retry moves it back to ``captures/ready/``, finalize's input.
- ``outbox``: an outbox entry the store refused (``manifest.json``); a retry moves it back
  to ``outbox/`` for the uplink.
- ``spool``: a redacted copy of spool files (``spool-…``); the originals stay in the spool,
  so a retry makes the spool pickup look at them again (their index marks are dropped).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agent import logs
from agent.cli import tabular
from agent.config import AgentConfig, load_agent_config, parse_duration
from agent.recorder.spool.index import SpoolIndex

log = logs.get_logger(__name__)

REASON_SUFFIX = ".reason"
_COPY_SUFFIX = re.compile(r"\.\d+$")  # quarantine() names a second entry "<id>.1"


@dataclass(frozen=True)
class Entry:
    path: Path
    stage: str  # capture | outbox | spool | unknown
    reason: str
    age_s: float
    size: int

    @property
    def name(self) -> str:
        return self.path.name


def _stage(path: Path) -> str:
    if path.name.startswith("spool-") and path.is_dir():
        return "spool"
    if (path / "manifest.json").is_file():
        return "outbox"
    if (path / "capture.json").is_file() or path.is_dir():
        return "capture"
    return "unknown"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _reason_file(path: Path) -> Path:
    return path.with_name(path.name + REASON_SUFFIX)


def entries(quarantine_dir: Path, now: float | None = None) -> list[Entry]:
    """Every entry, oldest first; its age is the time since it was quarantined."""
    now = time.time() if now is None else now
    found = []
    paths = quarantine_dir.iterdir() if quarantine_dir.is_dir() else iter(())
    for path in paths:
        if path.name.endswith(REASON_SUFFIX):
            continue
        reason_file = _reason_file(path)
        try:
            lines = reason_file.read_text(errors="replace").splitlines()
            since = reason_file.stat().st_mtime
        except OSError:
            lines, since = [], path.stat().st_mtime
        reason = lines[0].removeprefix("reason: ") if lines else "(no reason file)"
        found.append(Entry(path, _stage(path), reason, max(0.0, now - since), _size(path)))
    return sorted(found, key=lambda e: -e.age_s)


def remove(entry: Entry) -> None:
    if entry.path.is_dir():
        shutil.rmtree(entry.path)
    else:
        entry.path.unlink(missing_ok=True)
    _reason_file(entry.path).unlink(missing_ok=True)


def retry(cfg: AgentConfig, entry: Entry) -> str:
    """Put an entry back where it is processed again; what was done, in a sentence."""
    rid = _COPY_SUFFIX.sub("", entry.name)
    if entry.stage in ("capture", "outbox"):
        home = cfg.captures_dir / "ready" if entry.stage == "capture" else cfg.outbox_dir
        target = home / rid
        if target.exists():
            raise QuarantineError(f"{entry.name}: {target} exists already; not moved")
        home.mkdir(parents=True, exist_ok=True)
        entry.path.rename(target)
        _reason_file(entry.path).unlink(missing_ok=True)
        return f"{entry.name}: moved to {target}; the agent takes it on its next scan"
    if entry.stage == "spool":
        count = 0
        if (path := cfg.data_dir / "spool-index.sqlite3").exists():
            index = SpoolIndex(path, lambda name: name)  # unmarking needs no names
            try:
                count = index.unmark(entry.name)
            finally:
                index.close()
        return (
            f"{entry.name}: {count} spool file(s) will be looked at again on the next scan; "
            "this copy stays until you purge it"
        )
    raise QuarantineError(f"{entry.name}: unknown kind of entry; nothing to retry it with")


def expire(quarantine_dir: Path, max_age_s: float) -> int:
    """Delete entries older than ``max_age_s`` (one log line each); how many."""
    expired = 0
    for entry in entries(quarantine_dir):
        if entry.age_s <= max_age_s:
            break
        remove(entry)
        expired += 1
        log.warning(
            "quarantine_expired",
            entry=entry.name,
            stage=entry.stage,
            age_days=round(entry.age_s / 86400, 1),
            max_age_days=round(max_age_s / 86400, 1),
        )
    return expired


class QuarantineError(Exception):
    """An entry that can't be retried or found; exit code 2."""


# ---------------------------------------------------------------- CLI


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("quarantine", help="list, retry or purge the agent's quarantine")
    qs = q.add_subparsers(dest="quarantine_command", required=True)
    listing = qs.add_parser("list", help="entries: id, stage, age, size, reason")
    tabular.add_output_options(listing)
    again = qs.add_parser("retry", help="put entries back where the agent processes them")
    again.add_argument("entry", nargs="+", help="entry id as `list` shows it")
    purge = qs.add_parser("purge", help="delete entries by id or age")
    purge.add_argument("entry", nargs="*", help="entry ids to delete")
    purge.add_argument("--older-than", help='delete entries older than this, e.g. "30d"')
    purge.add_argument("--yes", action="store_true", help="really delete (else: only show)")
    for parser in (listing, again, purge):
        parser.add_argument("--config", type=Path, required=True, help="the agent's config")


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "quarantine":
        return None
    cfg = load_agent_config(args.config)
    try:
        if args.quarantine_command == "list":
            return _list(cfg, args.output)
        if args.quarantine_command == "retry":
            return _retry(cfg, args.entry)
        return _purge(cfg, args.entry, args.older_than, args.yes)
    except QuarantineError as exc:
        sys.stderr.write(f"callrec quarantine: {exc}\n")
        return 2


LIST_FIELDS = ("entry", "stage", "age_s", "size", "reason")


def _list(cfg: AgentConfig, output: str) -> int:
    found = entries(cfg.quarantine_dir)
    rows = [
        {"entry": e.name, "stage": e.stage, "age_s": round(e.age_s), "size": e.size,
         "reason": e.reason}
        for e in found
    ]  # fmt: skip
    lines = [
        f"{e.name}  {e.stage:7}  {_age(e.age_s):>5}  {e.size:>10} B  {e.reason}" for e in found
    ]
    tabular.emit(output, LIST_FIELDS, rows, lines)
    return 0


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.0f}d"
    return f"{seconds / 3600:.0f}h" if seconds >= 3600 else f"{seconds / 60:.0f}m"


def _pick(cfg: AgentConfig, names: list[str]) -> list[Entry]:
    by_name = {e.name: e for e in entries(cfg.quarantine_dir)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise QuarantineError(
            f"{', '.join(missing)}: no such entry (see `callrec quarantine list`)"
        )
    return [by_name[n] for n in names]


def _retry(cfg: AgentConfig, names: list[str]) -> int:
    for entry in _pick(cfg, names):
        sys.stdout.write(retry(cfg, entry) + "\n")
    return 0


def _purge(cfg: AgentConfig, names: list[str], older_than: str | None, yes: bool) -> int:
    if not names and older_than is None:
        raise QuarantineError("purge what? give entry ids or --older-than")
    chosen = _pick(cfg, names)
    if older_than is not None:
        try:
            limit = parse_duration(older_than)
        except ValueError:
            raise QuarantineError(f'--older-than {older_than}: expected e.g. "30d"') from None
        chosen += [e for e in entries(cfg.quarantine_dir) if e.age_s > limit and e not in chosen]
    for entry in chosen:
        if yes:
            remove(entry)
            log.warning("quarantine_purged", entry=entry.name, stage=entry.stage)
        sys.stdout.write(f"{'deleted' if yes else 'would delete'} {entry.name} ({entry.stage})\n")
    if chosen and not yes:
        sys.stdout.write("nothing deleted: add --yes to delete these\n")
    return 0
