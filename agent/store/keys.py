"""Master keys: each recording's data key is kept only wrapped by a master key.

``KeyWrapper`` is the boundary a KMS could implement (wrap/unwrap with a key id); the
default ``FileKeyWrapper`` reads a ``0600`` key file of ``<key id> <base64 32 bytes>``
lines, the first line being the key that wraps new data keys. Rotation without touching
audio: put a new line first (``add_master_key``), run ``rewrap_all`` (it re-wraps every
data key under the new key, in batches, resumable), then drop the old line
(``retire_master_key`` refuses while a data key still needs it).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent import logs
from agent.privacy import KeyFileError, check_private_file, read_key_file
from agent.store.catalog import Catalog, data_keys

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

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        """Returns (key id, wrapped key); ``context`` must be given again to unwrap."""
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

    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(_NONCE_BYTES)
        aad = _WRAP_LABEL + self._current.encode() + b"\x00" + context
        return self._current, nonce + AESGCM(self._keys[self._current]).encrypt(
            nonce, data_key, aad
        )

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        master = self._keys.get(key_id)
        if master is None:
            raise KeyWrapError(f"master key {key_id!r} is not in the key file")
        aad = _WRAP_LABEL + key_id.encode() + b"\x00" + context
        try:
            return AESGCM(master).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], aad)
        except InvalidTag:
            raise KeyWrapError(f"wrapped key does not open under {key_id!r}") from None


def new_key_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("mk%Y%m%d%H%M%S")


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
    query = (
        sa.select(data_keys.c.key_id, sa.func.count())
        .where(data_keys.c.wrapped_key.is_not(None))
        .group_by(data_keys.c.key_id)
    )
    with catalog.engine.connect() as conn:
        return {str(k): int(n) for k, n in conn.execute(query)}


def retire_master_key(path: Path, key_id: str, catalog: Catalog) -> None:
    in_use = keys_in_use(catalog).get(key_id, 0)
    if in_use:
        raise KeyFileError(f"{path}: key {key_id!r} still wraps {in_use} data keys; rewrap first")
    keep = [(k, s) for k, s in read_key_file(path) if k != key_id]
    if not keep:
        raise KeyFileError(f"{path}: {key_id!r} is the only key")
    text = "".join(f"{k} {base64.b64encode(s).decode()}\n" for k, s in keep)
    _write_private(path, text, exclusive=False)
    log.info("master_key_retired", path=path, key_id=key_id)


def open_master_keys(path: Path, catalog: Catalog) -> FileKeyWrapper:
    """Load the key file, creating it on a store that has no data keys yet; refuse to
    start when a data key needs a master key the file lacks."""
    in_use = keys_in_use(catalog)
    if not path.exists() and not in_use:
        create_master_key_file(path)
    elif not path.exists():
        raise KeyFileError(
            f"{path}: master key file missing, but {sum(in_use.values())} data keys are "
            f"wrapped by {', '.join(sorted(in_use))}"
        )
    wrapper = FileKeyWrapper.load(path)
    missing = sorted(set(in_use) - wrapper.key_ids())
    if missing:
        raise KeyFileError(f"{path}: data keys are wrapped by {', '.join(missing)}, not in file")
    return wrapper


def key_context(recording_id: str, blob_key: str) -> bytes:
    return f"{recording_id}/{blob_key}".encode()


def rewrap_all(catalog: Catalog, wrapper: KeyWrapper, batch: int = 500) -> int:
    """Re-wrap every live data key that is not under the current master key. Audio is
    not touched. Idempotent and resumable; a key shredded meanwhile stays shredded."""
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
            log.info("data_keys_rewrapped", count=done, key_id=current)
            return done
