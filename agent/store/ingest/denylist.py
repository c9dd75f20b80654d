"""Agent certificates the store refuses: by serial (one lost or stolen certificate) or
by site (every certificate of a site, e.g. a decommissioned office). Kept in the
catalog (``agent_denylist``, migration 0006) so that every store replica refuses the
same ones; checked on every Upload and QueryUpload, cached for a few seconds.

  callrec certs revoke --config store.toml (--serial HEX | --site SITE | --cert FILE) --reason R
  callrec certs unrevoke --config store.toml (--serial HEX | --site SITE)
  callrec certs revoked --config store.toml

Every change is written to the audit log.
"""

from __future__ import annotations

import argparse
import getpass
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from agent import certs
from agent.cli import tabular
from agent.config import ConfigError, load_store_config
from agent.store.catalog import Catalog, from_ms, metadata, now_ms

CACHE_S = 5.0

agent_denylist = sa.Table(
    "agent_denylist",
    metadata,
    sa.Column("kind", sa.String(8), primary_key=True),  # "serial" or "site"
    sa.Column("value", sa.String(64), primary_key=True),
    sa.Column("denied_at_ms", sa.BigInteger, nullable=False),
    sa.Column("denied_by", sa.String(200), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False, server_default=""),
)


class DenyList:
    def __init__(self, catalog: Catalog, cache_s: float = CACHE_S) -> None:
        self.catalog = catalog
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._loaded = -1e9
        self._entries: frozenset[tuple[str, str]] = frozenset()

    def _current(self) -> frozenset[tuple[str, str]]:
        with self._lock:
            if time.monotonic() - self._loaded >= self.cache_s:
                with self.catalog.engine.connect() as conn:
                    rows = conn.execute(sa.select(agent_denylist.c.kind, agent_denylist.c.value))
                    self._entries = frozenset((r.kind, r.value) for r in rows)
                self._loaded = time.monotonic()
            return self._entries

    def refusal(self, serial: str | None, site: str | None) -> str | None:
        """Why this certificate is refused, or None."""
        entries = self._current()
        if serial is not None and ("serial", serial) in entries:
            return f"certificate serial {serial} is revoked at this store"
        if site is not None and ("site", site) in entries:
            return f"site {site!r} is revoked at this store"
        return None


def add_parsers(certs_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    revoke = certs_sub.add_parser("revoke", help="refuse an agent certificate or site at ingest")
    revoke.add_argument("--config", type=Path, required=True, help="the store's config")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="certificate serial, hex (`callrec certs show`)")
    which.add_argument("--site", help="every certificate of this agent site")
    which.add_argument("--cert", type=Path, help="the certificate file")
    revoke.add_argument("--reason", required=True, help="why (written to the audit log)")
    unrevoke = certs_sub.add_parser("unrevoke", help="take a serial or site off the deny list")
    unrevoke.add_argument("--config", type=Path, required=True, help="the store's config")
    which = unrevoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="certificate serial, hex")
    which.add_argument("--site", help="every certificate of this agent site")
    listing = certs_sub.add_parser("revoked", help="the deny list")
    listing.add_argument("--config", type=Path, required=True, help="the store's config")
    tabular.add_output_options(listing)


def run(args: argparse.Namespace) -> list[str]:
    """``callrec certs revoke|unrevoke|revoked``: lines to print."""
    from agent.store.audit import chain as audit  # (audit imports this module for its table)

    catalog = Catalog(load_store_config(args.config).catalog_url)
    operator = f"operator:{getpass.getuser()}"
    try:
        catalog.migrate()
        if args.certs_command == "revoked":
            return _revoked(catalog, args.output)
        kind, value = _target(args)
        key = (agent_denylist.c.kind == kind) & (agent_denylist.c.value == value)
        with catalog.engine.begin() as conn:
            if args.certs_command == "revoke":
                conn.execute(sa.delete(agent_denylist).where(key))
                conn.execute(
                    sa.insert(agent_denylist).values(
                        kind=kind, value=value, denied_at_ms=now_ms(), denied_by=operator,
                        reason=args.reason[:200],
                    )
                )  # fmt: skip
            else:
                conn.execute(sa.delete(agent_denylist).where(key))
            audit.append(conn, operator, f"cert_{args.certs_command}", None,
                         args.reason[:200] if args.certs_command == "revoke" else "",
                         "allowed", detail=f"{kind}={value}")  # fmt: skip
        verb = "refused" if args.certs_command == "revoke" else "accepted again"
        return [f"{kind} {value}: {verb} at ingest (every store on this catalog, within 5 s)"]
    finally:
        catalog.close()


REVOKED_FIELDS = ("kind", "value", "denied_at", "denied_by", "reason")


def _revoked(catalog: Catalog, output: str) -> list[str]:
    """The deny list: lines to print, or nothing once written as JSON or CSV."""
    with catalog.engine.connect() as conn:
        found = conn.execute(sa.select(agent_denylist).order_by("kind", "value")).all()
    lines = [f"{r.kind:<6} {r.value}  by {r.denied_by}: {r.reason}" for r in found]
    if output == "text":
        return lines
    rows = [
        {"kind": r.kind, "value": r.value, "denied_at": from_ms(r.denied_at_ms).isoformat(),
         "denied_by": r.denied_by, "reason": r.reason}
        for r in found
    ]  # fmt: skip
    tabular.emit(output, REVOKED_FIELDS, rows, lines)
    return []


def _target(args: argparse.Namespace) -> tuple[str, str]:
    if getattr(args, "cert", None) is not None:
        return "serial", certs.serial_of(certs.load_cert(args.cert))
    if args.serial:
        serial = args.serial.lower().removeprefix("0x").replace(":", "")
        if not serial or len(serial) > 64 or any(c not in "0123456789abcdef" for c in serial):
            raise ConfigError(f"--serial {args.serial!r}: expected hex digits")
        return "serial", serial.lstrip("0") or "0"
    if not args.site or not certs.valid_site(args.site):
        raise ConfigError(f"--site {args.site!r}: expected a site name such as 'hel-1'")
    return "site", args.site
