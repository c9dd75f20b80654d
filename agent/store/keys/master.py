"""Master keys: each recording's data key is kept only wrapped by a master key.

``KeyWrapper`` is the boundary a KMS could implement (wrap/unwrap with a key id); the
default ``FileKeyWrapper`` reads a ``0600`` key file of ``<key id> <base64 32 bytes>``
lines, the first line being the key that wraps new data keys. Rotation without touching
audio: put a new line first (``add_master_key``), run ``rewrap_all`` (it re-wraps every
data key under the new key, in batches, resumable), then drop the old line
(``retire_master_key`` refuses while a data key still needs it). ``callrec keys
master …`` runs these. The PKCS#11 wrapper (``agent.store.keys.pkcs11``) keeps the
master keys in a token instead.

One key set per catalog: the catalog's ``master_keys`` table lists every master key
with a check value (a constant wrapped under it). ``open_key_wrapper`` refuses a key
source that lacks a key the catalog needs or holds another key under a known id, and
makes a first key only for a catalog that knows none, under a lock every store of
the catalog takes (so replicas starting at once make one key, not one each).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import logs
from agent.config import StoreConfig
from agent.privacy import KeyFileError, check_private_file, read_key_file
from agent.store.catalog import Catalog, data_keys, live_recordings, master_keys, now_ms

log = logs.get_logger(__name__)

_WRAP_LABEL = b"callrec-data-key-v1\x00"
_NONCE_BYTES = 12


class KeyWrapError(ValueError):
    """A wrapped data key that cannot be opened (unknown master key, tampered)."""


class KeyWrapper(Protocol):
    @property
    def current_key_id(self) -> str:
        """The master key that wraps new data keys."""
        ...

    def key_ids(self) -> frozenset[str]:
        """Every master key this wrapper can unwrap with."""
        ...

    @property
    def source(self) -> str:
        """Where the master keys live ("file", "pkcs11"), for logs and the registry."""
        ...

    def wrap(self, data_key: bytes, context: bytes, key_id: str | None = None) -> tuple[str, bytes]:
        """Returns (key id, wrapped key) under ``key_id`` (default: the current key);
        ``context`` must be given again to unwrap."""
        ...

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes: ...


class FileKeyWrapper:
    """AES-256-GCM key wrapping under master keys read from a private file."""

    def __init__(self, keys: tuple[tuple[str, bytes], ...]) -> None:
        if not keys:
            raise KeyFileError("no master keys")
        self._keys = dict(keys)
        self._current = keys[0][0]

    @classmethod
    def load(cls, path: Path) -> FileKeyWrapper:
        check_private_file(path)
        return cls(tuple(read_key_file(path)))

    @property
    def current_key_id(self) -> str:
        return self._current

    @property
    def source(self) -> str:
        return "file"

    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def wrap(self, data_key: bytes, context: bytes, key_id: str | None = None) -> tuple[str, bytes]:
        key_id = key_id or self._current
        nonce = os.urandom(_NONCE_BYTES)
        aad = wrap_aad(key_id, context)
        return key_id, nonce + AESGCM(self._keys[key_id]).encrypt(nonce, data_key, aad)

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        master = self._keys.get(key_id)
        if master is None:
            raise KeyWrapError(f"master key {key_id!r} is not in the key file")
        aad = wrap_aad(key_id, context)
        try:
            return AESGCM(master).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], aad)
        except InvalidTag:
            raise KeyWrapError(f"wrapped key does not open under {key_id!r}") from None


def wrap_aad(key_id: str, context: bytes) -> bytes:
    """What a wrapped data key is bound to: its master key id and its recording."""
    return _WRAP_LABEL + key_id.encode() + b"\x00" + context


def new_key_id() -> str:
    """``mk20261202-031500123-5f0c9a1e`` (UTC, to the millisecond): readable, ordered
    by creation, and unique even when two stores make one at once (the random part)."""
    now = dt.datetime.now(dt.UTC)
    return now.strftime("mk%Y%m%d-%H%M%S") + f"{now.microsecond // 1000:03d}-{secrets.token_hex(4)}"


def _line(key_id: str) -> str:
    return f"{key_id} {base64.b64encode(os.urandom(32)).decode()}\n"


def _write_private(path: Path, text: str, exclusive: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = path if exclusive else path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if not exclusive:
        os.replace(target, path)


def create_master_key_file(path: Path, key_id: str | None = None) -> str:
    """A new key file with one key; never overwrites."""
    key_id = key_id or new_key_id()
    _write_private(path, _line(key_id), exclusive=True)
    log.info("master_key_created", path=path, key_id=key_id)
    return key_id


def add_master_key(path: Path, key_id: str | None = None) -> str:
    """Put a new key first (it wraps from now on); the old ones stay for unwrapping."""
    old = read_key_file(path)
    key_id = key_id or new_key_id()
    if key_id in dict(old):
        raise KeyFileError(f"{path}: key id {key_id!r} is already there")
    _write_private(path, _line(key_id) + path.read_text(), exclusive=False)
    log.info("master_key_added", path=path, key_id=key_id)
    return key_id


def keys_in_use(catalog: Catalog) -> dict[str, int]:
    """How many live (not shredded) data keys each master key wraps."""
    with catalog.engine.connect() as conn:
        return _in_use(conn)


def _in_use(conn: sa.Connection) -> dict[str, int]:
    """Stored recordings' data keys and live calls' (streaming, waiting for their
    archive, or kept for a returning agent's tail)."""
    stored = (
        sa.select(data_keys.c.key_id, sa.func.count())
        .where(data_keys.c.wrapped_key.is_not(None))
        .group_by(data_keys.c.key_id)
    )
    live = sa.select(live_recordings.c.key_id, sa.func.count()).group_by(live_recordings.c.key_id)
    counts: dict[str, int] = {}
    for query in (stored, live):
        for key_id, count in conn.execute(query):
            counts[str(key_id)] = counts.get(str(key_id), 0) + int(count)
    return counts


def retire_master_key(path: Path, key_id: str, catalog: Catalog) -> None:
    """Drop ``key_id`` from the file and mark it retired in the catalog; refused while a
    data key still needs it (run ``rewrap_all`` first)."""
    in_use = keys_in_use(catalog).get(key_id, 0)
    if in_use:
        raise KeyFileError(f"{path}: key {key_id!r} still wraps {in_use} data keys; rewrap first")
    held = read_key_file(path)
    if held[0][0] == key_id:
        raise KeyFileError(f"{path}: {key_id!r} is the current key; rotate first")
    keep = [(k, s) for k, s in held if k != key_id]
    if len(keep) == len(held):
        raise KeyFileError(f"{path}: no key {key_id!r} in the file")
    text = "".join(f"{k} {base64.b64encode(s).decode()}\n" for k, s in keep)
    _write_private(path, text, exclusive=False)
    mark_retired(catalog, key_id)
    log.info("master_key_retired", path=path, key_id=key_id)


def mark_retired(catalog: Catalog, key_id: str) -> None:
    """The catalog no longer requires ``key_id`` of its stores."""
    with catalog.engine.begin() as conn:
        conn.execute(
            sa.update(master_keys)
            .where(master_keys.c.key_id == key_id, master_keys.c.retired_at_ms.is_(None))
            .values(retired_at_ms=now_ms())
        )


# ---------------------------------------------------------------- one key set per catalog

_CHECK_CONTEXT = b"callrec-master-key-check"
_CHECK_PLAIN = bytes(32)


class KeySetMismatch(KeyFileError):
    """The key source and the catalog disagree: another store's keys, or a stale copy."""


def open_master_keys(path: Path, catalog: Catalog) -> FileKeyWrapper:
    """The key file, checked against the catalog's registry of master keys (one key
    set for every store on a catalog). The file is created only when the catalog
    knows no master key at all (a new register); a store whose file is missing or
    lacks a key the catalog knows refuses to start."""
    with catalog.serialised() as conn:
        known, in_use = _registry(conn), _in_use(conn)
        if not path.exists():
            if needed := _needed(known, in_use):
                raise KeyFileError(
                    f"{path}: master key file missing, but the catalog knows master keys "
                    f"{', '.join(needed)}: copy the key file every store of this catalog "
                    "uses (it is never made again)"
                )
            try:
                create_master_key_file(path)
            except OSError as exc:
                raise KeyFileError(
                    f"{path}: cannot create the master key ({exc.strerror}); make it with "
                    "`callrec keys master init --config store.toml` as the store's user"
                ) from None
        wrapper = FileKeyWrapper.load(path)
        register_keys(conn, wrapper, str(path), known, in_use)
    return wrapper


def open_key_wrapper(config: StoreConfig, catalog: Catalog) -> KeyWrapper:
    """The configured key source, checked against the catalog (``open_master_keys``)."""
    inside = config.data_dir / "keys" / "master.key"
    if inside.exists():
        raise KeyFileError(
            f"{inside}: a master key inside data_dir (where older versions made it): move "
            f"it to {config.master_key_file} ([store.keys] master_key_file), so that a "
            "backup of the state does not carry the key that opens it"
        )
    if config.lookup_key_file is not None:
        log.warning(
            "lookup_key_obsolete",
            path=str(config.lookup_key_file),
            action="remove [store] lookup_key_file; numbers are found through seal.pem",
        )
    wrapper: KeyWrapper
    if config.keys.wrapper == "pkcs11":
        wrapper = open_token_keys(config, catalog)
    else:
        wrapper = open_master_keys(config.master_key_file, catalog)
    log.info("master_keys_opened", source=wrapper.source, current=wrapper.current_key_id)
    return wrapper


def open_token_keys(config: StoreConfig, catalog: Catalog) -> KeyWrapper:
    """The master keys in the configured PKCS#11 token, checked against the catalog;
    a first key is generated in the token only when the catalog knows none."""
    from agent.store.keys.pkcs11 import Pkcs11KeyWrapper

    wrapper = Pkcs11KeyWrapper.open(config.keys)
    where = f"PKCS#11 token {config.keys.pkcs11_token_label!r}"
    with catalog.serialised() as conn:
        known, in_use = _registry(conn), _in_use(conn)
        if not wrapper.key_ids():
            if needed := _needed(known, in_use):
                raise KeyFileError(
                    f"{where}: holds no callrec master key, but the catalog knows master "
                    f"keys {', '.join(needed)}: use the token that holds them"
                )
            wrapper.generate()
        register_keys(conn, wrapper, where, known, in_use)
    return wrapper


def check_and_register(catalog: Catalog, wrapper: KeyWrapper, where: str) -> None:
    """``register_keys`` in its own serialised transaction (after a key was added)."""
    with catalog.serialised() as conn:
        register_keys(conn, wrapper, where, _registry(conn), _in_use(conn))


def _needed(known: Mapping[str, tuple[bytes, bool]], in_use: Mapping[str, int]) -> list[str]:
    return sorted({*in_use, *(k for k, (_, retired) in known.items() if not retired)})


def _registry(conn: sa.Connection) -> dict[str, tuple[bytes, bool]]:
    """key id → (check value, retired)."""
    rows = conn.execute(
        sa.select(master_keys.c.key_id, master_keys.c.check_value, master_keys.c.retired_at_ms)
    )
    return {str(k): (bytes(c), r is not None) for k, c, r in rows}


def _holds(wrapper: KeyWrapper, key_id: str, check: bytes) -> bool:
    try:
        return wrapper.unwrap(key_id, check, _CHECK_CONTEXT) == _CHECK_PLAIN
    except KeyWrapError:
        return False


def register_keys(
    conn: sa.Connection,
    wrapper: KeyWrapper,
    where: str,
    known: Mapping[str, tuple[bytes, bool]],
    in_use: Mapping[str, int],
) -> None:
    """Refuse a wrapper that lacks a key the catalog needs or holds a different key
    under a known id; then record the wrapper's new keys with their check values."""
    held = wrapper.key_ids()
    for key_id, (check, _) in known.items():
        if key_id in held and not _holds(wrapper, key_id, check):
            raise KeySetMismatch(
                f"{where}: master key {key_id!r} is not the key this catalog knows by that "
                "id (another store's own key file?); every store of a catalog shares one"
            )
    required = set(in_use) | {k for k, (_, retired) in known.items() if not retired}
    if missing := sorted(required - held):
        raise KeySetMismatch(
            f"{where}: data keys are wrapped by {', '.join(missing)}, not in file "
            "(every store of a catalog must use one key set)"
        )
    for key_id in sorted(held - set(known)):
        _, check = wrapper.wrap(_CHECK_PLAIN, _CHECK_CONTEXT, key_id)
        conn.execute(
            sa.insert(master_keys).values(
                key_id=key_id, check_value=check, source=wrapper.source, created_at_ms=now_ms()
            )
        )
        log.info("master_key_registered", key_id=key_id, source=wrapper.source)


def key_context(recording_id: str, blob_key: str) -> bytes:
    return f"{recording_id}/{blob_key}".encode()


def rewrap_all(catalog: Catalog, wrapper: KeyWrapper, batch: int = 500) -> int:
    """Re-wrap every data key that is not under the current master key: stored
    recordings' and live calls'. Audio is not touched. Idempotent and resumable; a key
    shredded meanwhile stays shredded."""
    done = _rewrap_stored(catalog, wrapper, batch) + _rewrap_live(catalog, wrapper, batch)
    log.info("data_keys_rewrapped", count=done, key_id=wrapper.current_key_id)
    return done


def _rewrap_live(catalog: Catalog, wrapper: KeyWrapper, batch: int) -> int:
    """Live calls' data keys (``live_recordings``): an append that read the row before
    keeps its key in memory, one that reads it after unwraps the new wrapping."""
    current, done, table = wrapper.current_key_id, 0, live_recordings
    while True:
        query = catalog.skip_locked(
            sa.select(table.c.recording_id, table.c.key_id, table.c.wrapped_key)
            .where(table.c.key_id != current)
            .limit(batch)
        )
        with catalog.engine.begin() as conn:
            rows = conn.execute(query).all()
            for recording_id, key_id, wrapped in rows:
                context = key_context(recording_id, f"live-{recording_id}")
                plain = wrapper.unwrap(key_id, wrapped, context)
                new_id, new_wrapped = wrapper.wrap(plain, context)
                conn.execute(
                    sa.update(table)
                    .where(table.c.recording_id == recording_id, table.c.key_id == key_id)
                    .values(key_id=new_id, wrapped_key=new_wrapped)
                )
        done += len(rows)
        if not rows:
            return done


def _rewrap_stored(catalog: Catalog, wrapper: KeyWrapper, batch: int) -> int:
    current, done = wrapper.current_key_id, 0
    while True:
        query = catalog.skip_locked(
            sa.select(data_keys.c.blob_key, data_keys.c.recording_id, data_keys.c.key_id,
                      data_keys.c.wrapped_key)
            .where(data_keys.c.key_id != current, data_keys.c.wrapped_key.is_not(None))
            .limit(batch)
        )  # fmt: skip
        with catalog.engine.begin() as conn:
            rows = conn.execute(query).all()
            for blob_key, recording_id, key_id, wrapped in rows:
                context = key_context(recording_id, blob_key)
                plain = wrapper.unwrap(key_id, wrapped, context)
                new_id, new_wrapped = wrapper.wrap(plain, context)
                conn.execute(
                    sa.update(data_keys)
                    .where(data_keys.c.blob_key == blob_key, data_keys.c.key_id == key_id)
                    .where(data_keys.c.wrapped_key.is_not(None))
                    .values(key_id=new_id, wrapped_key=new_wrapped)
                )
        done += len(rows)
        if not rows:
            return done
