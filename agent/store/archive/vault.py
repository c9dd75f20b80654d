"""The encrypted blob store: data keys in the catalog, ciphertext in the blobs.

Order of writes (so that a kill at any instant leaves only what the sweeper finishes):
``store`` inserts the wrapped data key first, then writes the blob; the caller inserts
the recording row last. Every blob therefore has a ``data_keys`` row, and a key row
without a recording row older than the grace period is an abandoned attempt.
Destruction is the reverse: shred the key (``wrapped_key`` = NULL), delete the blob,
then delete the key row (and the recording row, in the sweeper).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

import sqlalchemy as sa

from agent import logs
from agent.config import StoreConfig
from agent.privacy import check_private_file
from agent.store.archive.blobs import Blobs, FileBlobs, S3Blobs
from agent.store.archive.crypto import (
    DEFAULT_CHUNK,
    HEADER_BYTES,
    CryptoError,
    Header,
    decrypt_chunks,
    encrypt_stream,
    new_data_key,
    span,
)
from agent.store.catalog import Catalog, RecordingRow, data_keys, now_ms, recordings
from agent.store.ingest.partials import FilePartials, Partials
from agent.store.ingest.s3_partials import S3Partials
from agent.store.keys.master import KeyWrapper, key_context, open_key_wrapper

log = logs.get_logger(__name__)

PARTIALS_PREFIX = "partials/"  # S3: partial uploads under partials/<blob prefix><id>/


class PlainSource(Protocol):
    """A plaintext to encrypt that is not a plain file: ``size`` bytes from ``read``."""

    size: int

    def read(self, count: int = -1) -> bytes: ...

    def close(self) -> None: ...


class KeyShredded(CryptoError):
    """The recording's data key is gone: its audio can never be read again."""


class SourceMismatch(CryptoError):
    """The bytes encrypted do not have the expected sha256; nothing was kept."""

    def __init__(self, recording_id: str, actual: str) -> None:
        super().__init__(recording_id, f"source changed before it was encrypted (sha256 {actual})")
        self.actual = actual


class Vault:
    def __init__(
        self,
        catalog: Catalog,
        blobs: Blobs,
        wrapper: KeyWrapper,
        chunk_size: int = DEFAULT_CHUNK,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.wrapper = wrapper
        self.chunk_size = chunk_size
        self.clock_ms = clock_ms

    @property
    def region(self) -> str:
        return self.blobs.region

    def store(
        self,
        recording_id: str,
        source: Path,
        work_dir: Path,
        expected_sha256: str | None = None,
        opener: Callable[[], PlainSource] | None = None,
    ) -> str:
        """Encrypt ``source`` under a fresh data key into a new blob; returns its key.
        ``source`` is left in place (the caller removes it once the row exists). With
        ``expected_sha256``, the sha256 of the bytes encrypted must match (one pass
        over the source both hashes and encrypts), else SourceMismatch and no blob.
        ``opener`` reads the plaintext instead of the file (an encrypted partial
        upload: ``partials.PartReader``)."""
        blob_key = f"{recording_id}-{secrets.token_hex(4)}"
        data_key = new_data_key()
        key_id, wrapped = self.wrapper.wrap(data_key, key_context(recording_id, blob_key))
        with self.catalog.engine.begin() as conn:
            conn.execute(
                sa.insert(data_keys).values(
                    blob_key=blob_key,
                    recording_id=recording_id,
                    key_id=key_id,
                    wrapped_key=wrapped,
                    created_at_ms=self.clock_ms(),
                )
            )
        sealed = work_dir / f".{blob_key}.enc"
        try:
            sha256 = self._encrypt(data_key, recording_id, source, sealed, opener)
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise SourceMismatch(recording_id, sha256)
            self.blobs.put_file(blob_key, sealed)
        except BaseException:
            sealed.unlink(missing_ok=True)
            self.discard(recording_id, blob_key)
            raise
        return blob_key

    def _encrypt(
        self,
        data_key: bytes,
        recording_id: str,
        source: Path,
        sealed: Path,
        opener: Callable[[], PlainSource] | None = None,
    ) -> str:
        fd = os.open(sealed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            if opener is None:
                with source.open("rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    sha256 = encrypt_stream(data_key, recording_id, src, size, out, self.chunk_size)
            else:
                plain = opener()
                try:
                    reader = cast(BinaryIO, plain)
                    sha256 = encrypt_stream(
                        data_key, recording_id, reader, plain.size, out, self.chunk_size
                    )
                finally:
                    plain.close()
            out.flush()
            os.fsync(out.fileno())
        return sha256

    def data_key(self, recording_id: str, blob_key: str) -> bytes:
        with self.catalog.engine.connect() as conn:
            found = conn.execute(
                sa.select(data_keys.c.key_id, data_keys.c.wrapped_key).where(
                    data_keys.c.blob_key == blob_key
                )
            ).first()
        if found is None or found.wrapped_key is None:
            raise KeyShredded(recording_id, "data key destroyed; the audio cannot be read")
        return self.wrapper.unwrap(
            found.key_id, found.wrapped_key, key_context(recording_id, blob_key)
        )

    def read(
        self, recording_id: str, blob_key: str, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """The plaintext (all of it, or ``length`` bytes from ``offset``), decrypted
        chunk by chunk as it streams from the blob store."""
        data_key = self.data_key(recording_id, blob_key)
        if offset == 0 and length is None:
            stream = self.blobs.read(blob_key)
            header, rest = _split_header(recording_id, stream)
            yield from decrypt_chunks(data_key, recording_id, header, _chain(rest, stream))
            return
        head = b"".join(self.blobs.read(blob_key, 0, HEADER_BYTES))
        header = Header.unpack(head, recording_id)
        part = span(header, offset, length)
        if part.take == 0:
            return
        cipher = self.blobs.read(blob_key, part.cipher_offset, part.cipher_length)
        chunks = decrypt_chunks(
            data_key, recording_id, header, cipher, part.first_chunk, part.last_chunk
        )
        skip, left = part.skip, part.take
        for plain in chunks:
            piece = plain[skip : skip + left]
            skip, left = 0, left - len(piece)
            if piece:
                yield piece

    def shred(self, blob_key: str) -> None:
        with self.catalog.engine.begin() as conn:
            conn.execute(
                sa.update(data_keys)
                .where(data_keys.c.blob_key == blob_key, data_keys.c.wrapped_key.is_not(None))
                .values(wrapped_key=None, shredded_at_ms=self.clock_ms())
            )

    def commit_row(self, row: RecordingRow) -> bool:
        """Insert the recording row (False: its id is already there) while its data key
        is whole, in one transaction that first locks the key row: a sweeper removing
        orphans (``discard_orphan``) and this commit never interleave, so a row is never
        written for a key that was shredded as an orphan (KeyShredded instead)."""
        with self.catalog.engine.begin() as conn:
            if not lock_whole_key(conn, row.blob_key):
                raise KeyShredded(
                    row.recording_id, "its data key was removed as an orphan before its row"
                )
            return conn.execute(self.catalog.insert_statement(row)).first() is not None

    def discard_orphan(self, recording_id: str, blob_key: str) -> bool:
        """``discard`` a key and blob no recording row refers to — checked after taking
        the key row's lock, so a commit that wrote the row meanwhile keeps it (False)."""
        with self.catalog.engine.begin() as conn:
            lock_whole_key(conn, blob_key)  # waits for a commit holding it
            row = sa.select(recordings.c.recording_id).where(recordings.c.blob_key == blob_key)
            if conn.execute(row.limit(1)).first() is not None:  # a fresh snapshot: see it
                return False
            conn.execute(
                sa.update(data_keys)
                .where(data_keys.c.blob_key == blob_key, data_keys.c.wrapped_key.is_not(None))
                .values(wrapped_key=None, shredded_at_ms=self.clock_ms())
            )
        self.discard(recording_id, blob_key)
        return True

    def discard(self, recording_id: str, blob_key: str) -> None:
        """Destroy a blob no recording row refers to: key, then blob, then key row."""
        self.shred(blob_key)
        self.blobs.delete(blob_key)
        with self.catalog.engine.begin() as conn:
            conn.execute(sa.delete(data_keys).where(data_keys.c.blob_key == blob_key))
        log.info("blob_discarded", recording_id=recording_id, blob_key=blob_key)


def lock_whole_key(conn: sa.Connection, blob_key: str) -> bool:
    """Lock the data key row (a write, so that on SQLite too the transaction holds the
    database's write lock from here on) if its key is whole; False: shredded or gone."""
    locked = conn.execute(
        sa.update(data_keys)
        .where(data_keys.c.blob_key == blob_key, data_keys.c.wrapped_key.is_not(None))
        .values(created_at_ms=data_keys.c.created_at_ms)
        .returning(data_keys.c.blob_key)
    ).first()
    return locked is not None


def _split_header(recording_id: str, stream: Iterator[bytes]) -> tuple[Header, bytes]:
    buffer = b""
    while len(buffer) < HEADER_BYTES:
        more = next(stream, None)
        if more is None:
            break
        buffer += more
    return Header.unpack(buffer, recording_id), buffer[HEADER_BYTES:]


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


@dataclass(frozen=True)
class Storage:
    catalog: Catalog
    blobs: Blobs
    vault: Vault


def open_blobs(config: StoreConfig) -> Blobs:
    """The configured blob store; S3 only after its region is verified (or attested)."""
    if config.blobs == "s3" and config.s3 is not None:
        if config.s3.secret_access_key_file is not None:
            check_private_file(config.s3.secret_access_key_file)
        s3 = S3Blobs(config.s3)
        s3.verify_residency(config.allowed_regions)
        return s3
    return FileBlobs(config.blobs_dir, config.region)


def open_storage(config: StoreConfig) -> Storage:
    """Catalog (migrated), blobs (residency checked) and the vault over them; raises
    ConfigError or KeyFileError naming what is wrong."""
    catalog = Catalog(config.catalog_url)
    try:
        catalog.migrate()
        blobs = open_blobs(config)
        wrapper = open_key_wrapper(config, catalog)
    except BaseException:
        catalog.close()
        raise
    return Storage(catalog, blobs, Vault(catalog, blobs, wrapper))


def open_partials(config: StoreConfig, vault: Vault) -> Partials:
    """Where partial uploads live: beside the blobs in S3 (under ``partials/``), where
    every replica sees them; else in this store's ``incoming/``."""
    blobs = vault.blobs
    if isinstance(blobs, S3Blobs):
        prefix = PARTIALS_PREFIX + blobs.prefix
        return S3Partials(blobs.client, blobs.bucket, prefix, vault.wrapper)
    return FilePartials(config.incoming_dir, vault.wrapper)
