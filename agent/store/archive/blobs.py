"""Blob storage for recording audio: one object per stored copy, written once.

Two implementations of one small Protocol: a directory tree (the embedded default:
each write lands under a temporary name, is fsynced and appears with one rename) and
S3-compatible object storage through boto3 (multipart above a threshold). Blobs hold
ciphertext only (``agent.store.archive.vault`` encrypts); keys are opaque names chosen by the
vault (``<recording id>-<random>``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from agent import logs
from agent.capture import fsync_dir
from agent.config import ConfigError, S3Config, toml_value
from agent.store.archive.residency import is_aws_host, region_allowed

log = logs.get_logger(__name__)

READ_CHUNK = 256 * 1024
S3_DELETE_BATCH = 1000  # the most DeleteObjects takes in one request


class BlobNotFound(KeyError):
    """No blob under that key."""


class Blobs(Protocol):
    @property
    def region(self) -> str:
        """Where the bytes are kept (a country code or an object-storage region)."""
        ...

    def put_file(self, key: str, source: Path) -> None:
        """Store ``source`` durably under ``key``; ``source`` is consumed (moved or
        deleted) once the blob is in place."""
        ...

    def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_bytes: int = READ_CHUNK
    ) -> Iterator[bytes]:
        """The bytes from ``offset`` (``length`` of them, or to the end)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error (idempotent)."""
        ...

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        """Remove several blobs (idempotent like ``delete``); returns the keys that
        could not be removed, with the reason. For the sweeper: one request per
        thousand objects on S3, one directory sync per batch on files."""
        ...

    def exists(self, key: str) -> bool: ...

    def keys(self) -> Iterator[str]:
        """Every stored key (for audits of the invariants, not for hot paths)."""
        ...

    def remove_partial(self, older_than_s: float) -> int:
        """Drop writes abandoned by a killed process (temporary files, incomplete
        multipart uploads) older than ``older_than_s``; returns how many."""
        ...


def check_key(key: str) -> str:
    if not key or "/" in key or key.startswith(".") or len(key) > 200:
        raise ValueError(f"bad blob key {key!r}")
    return key


class FileBlobs:
    def __init__(self, root: Path, region: str) -> None:
        self.root = root
        self._region = region
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def region(self) -> str:
        return self._region

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)[:2] / key

    def put_file(self, key: str, source: Path) -> None:
        """Move (or copy, across file systems) ``source`` into place durably."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{key}.tmp")
        try:
            os.replace(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            source.unlink()
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_bytes: int = READ_CHUNK
    ) -> Iterator[bytes]:
        try:
            fh = self._path(key).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        with fh:
            fh.seek(offset)
            left = length
            while left is None or left > 0:
                chunk = fh.read(chunk_bytes if left is None else min(chunk_bytes, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        touched: set[Path] = set()
        for key in keys:
            try:
                path = self._path(key)
                path.unlink()
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                failed[key] = str(exc)
                continue
            touched.add(path.parent)
        for directory in touched:
            fsync_dir(directory)
        return failed

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def keys(self) -> Iterator[str]:
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                yield from sorted(p.name for p in sub.iterdir() if not p.name.startswith("."))

    def remove_partial(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.root.glob("*/.*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class S3Blobs:
    """Blobs in one bucket of S3-compatible object storage."""

    def __init__(self, config: S3Config, client: Any = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        secret = None
        if config.secret_access_key_file is not None:
            secret = config.secret_access_key_file.read_text().strip()
        self.client = client or boto3.client(
            "s3",
            endpoint_url=config.endpoint,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=secret,
            config=Config(
                s3={"addressing_style": "path" if config.endpoint else "auto"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=config.multipart_threshold_bytes,
            multipart_chunksize=config.multipart_chunk_bytes,
            max_concurrency=4,
        )

    @property
    def region(self) -> str:
        return self.config.region

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def verify_residency(self, allowed: tuple[str, ...]) -> None:
        """Refuse (ConfigError naming the key) a bucket whose region is outside
        ``allowed`` or that cannot say where it is, unless the operator attested it."""
        cfg = self.config
        if not region_allowed(cfg.region, allowed):
            raise ConfigError(
                f"[store.s3] region = {toml_value(cfg.region)}: expected an allowed region"
            )
        reported = self._bucket_region()
        if reported:
            if reported != cfg.region:
                raise ConfigError(
                    f"[store.s3] region = {cfg.region!r}: bucket {cfg.bucket!r} reports "
                    f"region {reported!r}"
                )
            return
        host = (urlsplit(cfg.endpoint).hostname or "") if cfg.endpoint else "amazonaws.com"
        if is_aws_host(host):
            raise ConfigError(
                f"[store.s3] region = {cfg.region!r}: bucket {cfg.bucket!r} reports no "
                "region, which on AWS means us-east-1 (outside the allowed regions)"
            )
        if not cfg.region_attestation.strip():
            raise ConfigError(
                f"[store.s3] endpoint = {cfg.endpoint!r}: does not report the bucket's "
                f"region, so the store cannot verify that it keeps data in {cfg.region!r}; "
                'expected region_attestation = "<where it runs, who says so>"'
            )
        log.warning(
            "s3_region_attested",
            endpoint=cfg.endpoint,
            bucket=cfg.bucket,
            region=cfg.region,
            attestation=cfg.region_attestation,
        )

    def _bucket_region(self) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_bucket_location(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise ConfigError(
                f"[store.s3] bucket = {toml_value(self.bucket)}: cannot read its location ({code})"
            ) from None
        except BotoCoreError as exc:
            raise ConfigError(
                f"[store.s3] endpoint = {self.config.endpoint!r}: unreachable ({exc})"
            ) from None
        location = answer.get("LocationConstraint") or ""
        return "eu-west-1" if location == "EU" else str(location).lower()

    def put_file(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._name(key), Config=self.transfer)
        source.unlink()

    def read(
        self, key: str, offset: int = 0, length: int | None = None, chunk_bytes: int = READ_CHUNK
    ) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        if length == 0:
            return
        end = "" if length is None else str(offset + length - 1)
        try:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=self._name(key), Range=f"bytes={offset}-{end}"
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise BlobNotFound(key) from None
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return
            raise
        body = answer["Body"]
        try:
            yield from body.iter_chunks(chunk_bytes)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_many(self, keys: Sequence[str]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = list(keys[start : start + S3_DELETE_BATCH])
            names = {self._name(key): key for key in batch}
            answer = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
            )
            for error in answer.get("Errors", []):
                key = names.get(error.get("Key", ""), error.get("Key", "?"))
                failed[key] = f"{error.get('Code', '?')}: {error.get('Message', '')}"
        return failed

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def keys(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = str(item["Key"])[len(self.prefix) :]
                if "/" not in key:  # not a blob: partial uploads (``s3_partials``)
                    yield key

    def remove_partial(self, older_than_s: float) -> int:
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)
        removed = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    removed += 1
        return removed
