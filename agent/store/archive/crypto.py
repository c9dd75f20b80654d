"""Audio at rest: AES-256-GCM in fixed-size chunks, so playback can stream and seek.

A blob is a 24-byte header followed by the chunks::

    header  = "CRA1" | version (1) | 3 zero bytes | chunk_size (u32) |
              nonce_prefix (4 random bytes) | plaintext_size (u64)      -- big-endian
    chunk i = AES-GCM(data_key, nonce = nonce_prefix | i (u64),
                      plaintext[i*chunk_size : (i+1)*chunk_size],
                      aad = "callrec-audio-v1" | recording_id | header | i (u64) | final (u8))

Every chunk but the last holds ``chunk_size`` plaintext bytes (+16 tag bytes); an empty
recording is one empty final chunk. Binding the recording id, the header, the index and
the final flag into each tag makes swapped, reordered, truncated or extended blobs fail
authentication. Each recording has its own data key, so (key, nonce) never repeats.
Pure functions over byte streams; the vault does the I/O.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"CRA1"
VERSION = 1
KEY_BYTES = 32
TAG_BYTES = 16
DEFAULT_CHUNK = 64 * 1024
_HEADER = struct.Struct(">4sBxxxI4sQ")
HEADER_BYTES = _HEADER.size
_AAD_LABEL = b"callrec-audio-v1\x00"


class CryptoError(ValueError):
    """A blob that cannot be decrypted as it should; the message names the recording."""

    def __init__(self, recording_id: str, message: str) -> None:
        super().__init__(f"recording {recording_id}: {message}")
        self.recording_id = recording_id


@dataclass(frozen=True)
class Header:
    chunk_size: int
    nonce_prefix: bytes
    plaintext_size: int

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, self.chunk_size, self.nonce_prefix, self.plaintext_size)

    @classmethod
    def unpack(cls, data: bytes, recording_id: str) -> Header:
        if len(data) < HEADER_BYTES:
            raise CryptoError(recording_id, "blob shorter than its header")
        magic, version, chunk_size, prefix, size = _HEADER.unpack(data[:HEADER_BYTES])
        if magic != MAGIC or version != VERSION or chunk_size <= 0:
            raise CryptoError(recording_id, "not an encrypted callrec blob (bad header)")
        return cls(chunk_size, prefix, size)

    @property
    def chunks(self) -> int:
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def ciphertext_size(self) -> int:
        return HEADER_BYTES + self.plaintext_size + self.chunks * TAG_BYTES

    def plain_len(self, index: int) -> int:
        return min(self.chunk_size, self.plaintext_size - index * self.chunk_size)

    def chunk_offset(self, index: int) -> int:
        return HEADER_BYTES + index * (self.chunk_size + TAG_BYTES)


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def _nonce(header: Header, index: int) -> bytes:
    return header.nonce_prefix + index.to_bytes(8, "big")


def _aad(header: Header, recording_id: str, index: int) -> bytes:
    final = 1 if index == header.chunks - 1 else 0
    return b"".join(
        (
            _AAD_LABEL,
            recording_id.encode(),
            b"\x00",
            header.pack(),
            struct.pack(">QB", index, final),
        )
    )


def encrypt_stream(
    data_key: bytes,
    recording_id: str,
    source: BinaryIO,
    size: int,
    out: BinaryIO,
    chunk_size: int = DEFAULT_CHUNK,
) -> str:
    """Encrypt exactly ``size`` bytes of ``source`` into ``out``; returns the sha256
    (hex) of the plaintext read, so the caller can check it against the receipt."""
    header = Header(chunk_size, os.urandom(4), size)
    aead = AESGCM(data_key)
    digest = hashlib.sha256()
    out.write(header.pack())
    for index in range(header.chunks):
        block = _read_exactly(source, header.plain_len(index))
        if len(block) != header.plain_len(index):
            raise CryptoError(recording_id, f"source ended before {size} bytes")
        digest.update(block)
        out.write(aead.encrypt(_nonce(header, index), block, _aad(header, recording_id, index)))
    if source.read(1):
        raise CryptoError(recording_id, f"source is longer than {size} bytes")
    return digest.hexdigest()


def _read_exactly(source: BinaryIO, count: int) -> bytes:
    parts: list[bytes] = []
    while count > 0 and (part := source.read(count)):
        parts.append(part)
        count -= len(part)
    return b"".join(parts)


@dataclass(frozen=True)
class Span:
    """The chunks and ciphertext bytes that hold a plaintext range."""

    first_chunk: int
    last_chunk: int
    cipher_offset: int
    cipher_length: int
    skip: int  # plaintext bytes to drop from the first chunk
    take: int  # plaintext bytes to return in all


def span(header: Header, offset: int, length: int | None) -> Span:
    size = header.plaintext_size
    offset = min(max(0, offset), size)
    end = size if length is None else min(size, offset + max(0, length))
    if end <= offset:
        return Span(0, -1, header.chunk_offset(0), 0, 0, 0)
    first, last = offset // header.chunk_size, (end - 1) // header.chunk_size
    start = header.chunk_offset(first)
    stop = header.chunk_offset(last) + header.plain_len(last) + TAG_BYTES
    return Span(first, last, start, stop - start, offset - first * header.chunk_size, end - offset)


def decrypt_chunks(
    data_key: bytes,
    recording_id: str,
    header: Header,
    ciphertext: Iterable[bytes],
    first_chunk: int = 0,
    last_chunk: int | None = None,
) -> Iterator[bytes]:
    """Decrypt chunks ``first_chunk..last_chunk`` from ``ciphertext``, which starts at
    ``first_chunk``'s first byte. Reading to the final chunk also checks that nothing
    follows it."""
    last = header.chunks - 1 if last_chunk is None else last_chunk
    aead = AESGCM(data_key)
    stream = iter(ciphertext)
    buffer, pos = bytearray(), 0
    for index in range(first_chunk, last + 1):
        need = header.plain_len(index) + TAG_BYTES
        while len(buffer) - pos < need:
            more = next(stream, None)
            if more is None:
                raise CryptoError(recording_id, f"blob truncated in chunk {index}")
            del buffer[:pos]
            buffer += more
            pos = 0
        sealed, pos = bytes(buffer[pos : pos + need]), pos + need
        try:
            yield aead.decrypt(_nonce(header, index), sealed, _aad(header, recording_id, index))
        except InvalidTag:
            raise CryptoError(recording_id, f"chunk {index} fails authentication") from None
    if last == header.chunks - 1 and (len(buffer) > pos or any(stream)):
        raise CryptoError(recording_id, "data after the final chunk")
