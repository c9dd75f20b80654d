"""Blob stores: the same bodies on local files and on a real S3 server (SeaweedFS),
and the residency checks the store makes before it keeps anything in S3."""

# Fixtures are imported from tests.support.services; test arguments name them.
# ruff: noqa: F811

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, S3Config, store_config_from_dict
from agent.store.archive.blobs import BlobNotFound, Blobs, S3Blobs
from agent.store.archive.residency import (
    DEFAULT_ALLOWED_REGIONS,
    aws_endpoint_region,
    region_allowed,
)
from agent.store.archive.vault import open_blobs
from tests.support.services import ATTESTATION, Backend, SeaweedFS, backend, postgres, seaweed  # noqa: F401 (fixtures)


@pytest.fixture
def blobs(backend: Backend) -> Blobs:
    return open_blobs(backend.config())


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_put_read_exists_delete(blobs: Blobs, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    source = _file(tmp_path, "a.bin", data)
    blobs.put_file("abc-1", source)
    assert not source.exists(), "the source is consumed"
    assert blobs.exists("abc-1")
    assert b"".join(blobs.read("abc-1", chunk_bytes=65536)) == data
    assert "abc-1" in set(blobs.keys())
    blobs.delete("abc-1")
    blobs.delete("abc-1")  # idempotent
    assert not blobs.exists("abc-1")
    assert "abc-1" not in set(blobs.keys())
    with pytest.raises(BlobNotFound):
        b"".join(blobs.read("abc-1"))


def test_delete_many_removes_a_batch_and_ignores_missing_keys(blobs: Blobs, tmp_path: Path) -> None:
    keys = [f"many-{i}" for i in range(5)]
    for key in keys:
        blobs.put_file(key, _file(tmp_path, f"{key}.bin", key.encode() * 100))
    assert blobs.delete_many([*keys[:4], "never-stored-1"]) == {}
    assert [k for k in keys if blobs.exists(k)] == ["many-4"]
    assert blobs.delete_many(keys[:4]) == {}  # idempotent
    assert b"".join(blobs.read("many-4")) == b"many-4" * 100


def test_ranged_reads(blobs: Blobs, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    blobs.put_file("rng-1", _file(tmp_path, "r.bin", data))
    assert b"".join(blobs.read("rng-1", offset=1000, length=5000)) == data[1000:6000]
    assert b"".join(blobs.read("rng-1", offset=len(data) - 10)) == data[-10:]
    assert b"".join(blobs.read("rng-1", offset=0, length=24)) == data[:24]
    assert b"".join(blobs.read("rng-1", offset=5, length=0)) == b""


def test_bad_keys_are_refused(blobs: Blobs, tmp_path: Path) -> None:
    for key in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="bad blob key"):
            blobs.put_file(key, _file(tmp_path, "k.bin", b"x"))


@pytest.mark.slow
def test_large_file_goes_up_in_parts(backend: Backend, tmp_path: Path) -> None:
    cfg = backend.config()
    if backend.distributed:
        assert cfg.s3 is not None
        cfg = store_config_from_dict(
            {"store": {**backend.doc["store"], "s3": {**backend.doc["store"]["s3"],
             "multipart_threshold_mb": 5, "multipart_chunk_mb": 5}}},
            backend.root,
        )  # fmt: skip
    blobs = open_blobs(cfg)
    data = os.urandom(12 * 1024 * 1024 + 123)
    calls: list[str] = []
    if isinstance(blobs, S3Blobs):
        blobs.client.meta.events.register(
            "before-call.s3.UploadPart", lambda **kw: calls.append("part")
        )
    blobs.put_file("big-1", _file(tmp_path, "big.bin", data))
    assert b"".join(blobs.read("big-1", chunk_bytes=1 << 20)) == data
    if isinstance(blobs, S3Blobs):
        assert len(calls) == 3, "12 MiB in 5 MiB parts"


def test_abandoned_partial_writes_are_removed_after_grace(blobs: Blobs, tmp_path: Path) -> None:
    if isinstance(blobs, S3Blobs):
        blobs.client.create_multipart_upload(Bucket=blobs.bucket, Key=blobs.prefix + "part-1")
    else:
        tmp = blobs.root / "pa" / ".part-1.tmp"  # type: ignore[attr-defined]
        tmp.parent.mkdir(parents=True)
        tmp.write_bytes(b"half")
        old = time.time() - 3600
        os.utime(tmp, (old, old))
    assert blobs.remove_partial(older_than_s=24 * 3600) == 0, "still within the grace period"
    time.sleep(1.1)
    assert blobs.remove_partial(older_than_s=1) == 1
    assert blobs.remove_partial(older_than_s=1) == 0


# ---------------------------------------------------------------- residency


def test_default_regions_are_eu_eea_only() -> None:
    for ok in ("fi", "se", "de", "no", "is", "li", "eu-north-1", "eu-central-1", "eu-west-1"):
        assert region_allowed(ok, DEFAULT_ALLOWED_REGIONS), ok
    for bad in ("us", "gb", "ch", "eu-west-2", "eu-central-2", "us-east-1", "", "eu-*", "FI-x"):
        assert not region_allowed(bad, DEFAULT_ALLOWED_REGIONS), bad
    assert region_allowed("FI", DEFAULT_ALLOWED_REGIONS)
    assert region_allowed("fr-par", ("fr-*",))


def test_aws_endpoint_regions() -> None:
    assert aws_endpoint_region("s3.eu-north-1.amazonaws.com") == "eu-north-1"
    assert aws_endpoint_region("bucket.s3.eu-west-3.amazonaws.com") == "eu-west-3"
    assert aws_endpoint_region("s3.dualstack.eu-west-1.amazonaws.com") == "eu-west-1"
    assert aws_endpoint_region("s3-eu-west-1.amazonaws.com") == "eu-west-1"
    assert aws_endpoint_region("s3.amazonaws.com") is None
    assert aws_endpoint_region("storage.example.fi") is None


def _store_doc(tmp_path: Path, **s3: object) -> dict[str, Any]:
    return {
        "store": {
            "data_dir": str(tmp_path / "d"),
            "blobs": "s3",
            "s3": {"bucket": "b", "region": "eu-north-1", **s3},
        }
    }


@pytest.mark.parametrize(
    ("s3", "store", "key"),
    [
        ({"region": "us-east-1"}, {}, '[store.s3] region = "us-east-1"'),
        ({"region": "eu-west-2"}, {}, '[store.s3] region = "eu-west-2"'),
        ({"endpoint": "https://s3.us-east-1.amazonaws.com"}, {}, "[store.s3] endpoint"),
        ({"endpoint": "https://s3.amazonaws.com"}, {}, "[store.s3] endpoint"),
        ({"endpoint": "ftp://x"}, {}, "[store.s3] endpoint"),
        ({"access_key_id": "AK"}, {}, "[store.s3] access_key_id"),
        ({}, {"region": "us"}, '[store] region = "us"'),
        ({}, {"allowed_regions": ["fi"]}, '[store.s3] region = "eu-north-1"'),
        ({}, {"blobs": "files"}, '[store] blobs = "files"'),
        ({"colour": "blue"}, {}, "[store.s3] colour: unknown key"),
    ],
)
def test_config_refuses_storage_outside_the_allowed_regions(
    tmp_path: Path, s3: dict[str, object], store: dict[str, object], key: str
) -> None:
    doc = _store_doc(tmp_path, **s3)
    doc["store"].update(store)
    with pytest.raises(ConfigError) as err:
        store_config_from_dict(doc, tmp_path)
    assert str(err.value).startswith(key)


def test_store_refuses_an_s3_endpoint_that_cannot_say_where_it_is(
    seaweed: SeaweedFS, tmp_path: Path
) -> None:
    section = seaweed.s3_section(seaweed.new_bucket())
    del section["region_attestation"]
    cfg = store_config_from_dict(_store_doc(tmp_path, **section), tmp_path)
    with pytest.raises(ConfigError, match=r"^\[store.s3\] endpoint = .*cannot verify"):
        open_blobs(cfg)
    attested = store_config_from_dict(
        _store_doc(tmp_path, **section, region_attestation=ATTESTATION), tmp_path
    )
    assert open_blobs(attested).region == "eu-north-1"


def test_store_refuses_a_missing_bucket(seaweed: SeaweedFS, tmp_path: Path) -> None:
    section = seaweed.s3_section("no-such-bucket")
    cfg = store_config_from_dict(_store_doc(tmp_path, **section), tmp_path)
    with pytest.raises(ConfigError, match=r"^\[store.s3\] bucket = \"no-such-bucket\""):
        open_blobs(cfg)


class _ReportsRegion:
    """SeaweedFS reports no bucket region, so this one call is stubbed (the only fake
    here): what AWS answers for a bucket in another region."""

    def __init__(self, region: str | None) -> None:
        self.region = region

    def get_bucket_location(self, Bucket: str) -> dict[str, Any]:
        return {"LocationConstraint": self.region}


@pytest.mark.parametrize(
    ("reported", "error"),
    [("us-west-2", "reports region 'us-west-2'"), (None, "us-east-1"), ("eu-north-1", None)],
)
def test_bucket_region_must_match(reported: str | None, error: str | None) -> None:
    blobs = S3Blobs(S3Config(bucket="b", region="eu-north-1"), client=_ReportsRegion(reported))
    if error is None:
        blobs.verify_residency(DEFAULT_ALLOWED_REGIONS)
        return
    with pytest.raises(ConfigError, match=r"^\[store.s3\] region") as err:
        blobs.verify_residency(DEFAULT_ALLOWED_REGIONS)
    assert error in str(err.value)
