"""``callrec keys``: the keys an operator creates, rotates and retires. Wired into
``agent/cli/main.py`` by ``add_parsers(sub)`` and ``dispatch(args)`` (None: not one of these).

  callrec keys init DIR                          seal.pem (store) + seal.pub.pem (agents)
  callrec keys master init   --config store.toml  the first master key of a new catalog
  callrec keys master list   --config store.toml  master keys: file, catalog, data keys
  callrec keys master rotate --config store.toml  a new master key wraps from the next start
  callrec keys master rewrap --config store.toml  re-wrap every data key under the current key
  callrec keys master retire KEY_ID --config store.toml   once no data key needs it
  callrec keys seal rotate --config store.toml --public-out seal.pub.pem

The master key wraps each recording's data key (``agent.store.keys.master``); ``seal.pem``
opens the last digits of customers' numbers (``agent.store.keys.numbers``). Both stay on the
store host, outside ``data_dir``; agents hold only ``seal.pub.pem``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from agent.cli import tabular
from agent.config import ConfigError, StoreConfig, load_store_config
from agent.privacy import KeyFileError, new_seal_keypair
from agent.store.catalog import Catalog, master_keys
from agent.store.keys.master import (
    KeyWrapper,
    add_master_key,
    check_and_register,
    keys_in_use,
    mark_retired,
    open_key_wrapper,
    retire_master_key,
    rewrap_all,
)
from agent.store.keys.numbers import SealKeyring, rotate_seal_key

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_parsers(sub: SubParsers) -> None:
    keys = sub.add_parser("keys", help="key management")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create seal.pem (store) and seal.pub.pem (agents)")
    init.add_argument("directory", type=Path, help="where seal.pem and seal.pub.pem go")

    master = keys_sub.add_parser("master", help="the store's master keys")
    msub = master.add_subparsers(dest="master_command", required=True)
    for name, text in (
        ("init", "create the master key file of a new catalog (never when it knows keys)"),
        ("list", "master keys in the key file and the catalog, with data keys per key"),
        ("rotate", "add a new master key; it wraps new data keys once the stores restart"),
        ("rewrap", "re-wrap every data key under the current master key (audio untouched)"),
        ("retire", "drop a master key that no data key needs any more"),
    ):
        cmd = msub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, required=True, help="store.toml")
        if name == "retire":
            cmd.add_argument("key_id", help="as `callrec keys master list` shows it")
        if name == "list":
            tabular.add_output_options(cmd)

    seal = keys_sub.add_parser("seal", help="the seal key pair (customers' last digits)")
    ssub = seal.add_subparsers(dest="seal_command", required=True)
    rotate = ssub.add_parser("rotate", help="a new seal key first in seal.pem; older ones stay")
    rotate.add_argument("--config", type=Path, required=True, help="store.toml")
    rotate.add_argument("--public-out", type=Path, required=True, help="new seal.pub.pem")


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "keys":
        return None
    if args.keys_command == "init":
        return keys_init(args.directory)
    config = load_store_config(args.config)
    if args.keys_command == "seal":
        return seal_rotate(config, args.public_out)
    with _catalog(config) as catalog:
        command = args.master_command
        if config.keys.wrapper == "pkcs11" and command in ("rotate", "retire"):
            return _token_command(config, catalog, command, getattr(args, "key_id", ""))
        if command == "retire":
            retire_master_key(config.master_key_file, args.key_id, catalog)
            _out(f"retired {args.key_id} (removed from {config.master_key_file})")
            return 0
        if command == "rotate":
            new_id = add_master_key(config.master_key_file)
            open_key_wrapper(config, catalog)  # registers it in the catalog
            _out(
                f"added {new_id} to {config.master_key_file}; copy the file to every store "
                "of this catalog, restart them, then run `callrec keys master rewrap`"
            )
            return 0
        if command == "init" and config.master_key_file.exists():
            raise ConfigError(f"{config.master_key_file}: exists; nothing to do")
        wrapper = open_key_wrapper(config, catalog)
        if command == "init":
            _out(f"created {config.master_key_file} ({wrapper.current_key_id}); back it up "
                 "apart from data_dir and the catalog")  # fmt: skip
            return 0
        if command == "rewrap":
            count = rewrap_all(catalog, wrapper)
            _out(f"re-wrapped {count} data keys under {wrapper.current_key_id}")
            return 0
        return _list(catalog, wrapper, args.output)


@contextmanager
def _catalog(config: StoreConfig) -> Iterator[Catalog]:
    catalog = Catalog(config.catalog_url)
    try:
        catalog.migrate()
        yield catalog
    finally:
        catalog.close()


def _token_command(config: StoreConfig, catalog: Catalog, command: str, key_id: str) -> int:
    """rotate / retire when the master keys are in a PKCS#11 token."""
    from agent.store.keys.pkcs11 import Pkcs11KeyWrapper

    wrapper = open_key_wrapper(config, catalog)
    assert isinstance(wrapper, Pkcs11KeyWrapper)
    token = f"PKCS#11 token {config.keys.pkcs11_token_label!r}"
    try:
        if command == "rotate":
            new_id = wrapper.generate()
            check_and_register(catalog, wrapper, token)
            _out(f"generated {new_id} in {token}; restart the stores, then run "
                 "`callrec keys master rewrap`")  # fmt: skip
            return 0
        if in_use := keys_in_use(catalog).get(key_id, 0):
            raise KeyFileError(
                f"{token}: key {key_id!r} still wraps {in_use} data keys; rewrap first"
            )
        if key_id == wrapper.current_key_id or key_id not in wrapper.key_ids():
            raise KeyFileError(f"{token}: {key_id!r} is the current key or not in the token")
        wrapper.destroy(key_id)
        mark_retired(catalog, key_id)
        _out(f"retired {key_id} (destroyed in {token})")
        return 0
    finally:
        wrapper.close()


LIST_FIELDS = ("key_id", "state", "here", "data_keys")


def _list(catalog: Catalog, wrapper: KeyWrapper, output: str) -> int:
    in_use = keys_in_use(catalog)
    with catalog.engine.connect() as conn:
        found = conn.execute(sa.select(master_keys).order_by(master_keys.c.created_at_ms)).all()
    rows: list[dict[str, object]] = []
    for row in found:
        state = "retired" if row.retired_at_ms is not None else "active"
        here = "current" if row.key_id == wrapper.current_key_id else (
            "held" if row.key_id in wrapper.key_ids() else "not held"
        )  # fmt: skip
        rows.append(
            {"key_id": row.key_id, "state": state, "here": here,
             "data_keys": in_use.get(row.key_id, 0)}
        )  # fmt: skip
    lines = [
        f"{r['key_id']}  {r['state']:7}  {r['here']:8}  data_keys={r['data_keys']}" for r in rows
    ]
    tabular.emit(output, LIST_FIELDS, rows, lines)
    return 0


def seal_rotate(config: StoreConfig, public_out: Path) -> int:
    if config.seal_key_file is None:
        raise ConfigError("[store] seal_key_file: missing; it names the seal keyring")
    if public_out.exists():
        raise ConfigError(f"{public_out}: exists; give a new file for the new public key")
    public = rotate_seal_key(config.seal_key_file)
    public_out.write_bytes(public)
    count = len(SealKeyring.load(config.seal_key_file).keys)
    _out(
        f"{config.seal_key_file}: a new seal key first ({count} keys; older ones still open "
        f"older recordings). Give {public_out} to every agent ([privacy] "
        "seal_public_key_file) and restart them."
    )
    return 0


def keys_init(directory: Path) -> int:
    """Write ``seal.pem`` (the store's keyring: it opens the sealed digits) and
    ``seal.pub.pem`` (agents seal to it). Existing files are never overwritten. No
    lookup key: agents no longer hold one (see README, "Security model")."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = new_seal_keypair()
    for name, content in (("seal.pem", private), ("seal.pub.pem", public)):
        path = directory / name
        if path.exists():
            _out(f"kept     {path} (exists)")
            continue
        mode = 0o644 if name.endswith(".pub.pem") else 0o600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
        _out(f"created  {path} (mode {mode:o})")
    return 0


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
