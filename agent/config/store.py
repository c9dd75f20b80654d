"""The store's config (``store.toml``): ``[store]`` and its ``[store.s3]``,
``[store.keys]``, ``[store.tls]`` and ``[store.oidc]`` tables, and ``[log]``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.config.parsing import (
    _REQUIRED,
    LOG_LEVELS,
    TlsConfig,
    _collecting,
    _listen,
    _load_toml,
    _optional_path,
    _optional_text,
    _Section,
    _sections,
    _size,
    _subsection,
    _transport,
    is_loopback,
    parse_months,
)
from agent.store.archive.residency import (
    DEFAULT_ALLOWED_REGIONS,
    aws_endpoint_region,
    is_aws_host,
    region_allowed,
    valid_region_pattern,
)

MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes with its terminating NUL


@dataclass(frozen=True)
class S3Config:
    """Object storage for the audio blobs (``[store.s3]``)."""

    bucket: str
    region: str
    endpoint: str | None = None  # None: AWS, from the region
    prefix: str = "recordings/"
    access_key_id: str | None = None  # None: boto3's default credential chain
    secret_access_key_file: Path | None = None
    multipart_threshold_bytes: int = 64 * 1024 * 1024
    multipart_chunk_bytes: int = 16 * 1024 * 1024
    # An endpoint that cannot report its bucket's region (SeaweedFS, Ceph, …) is
    # refused unless the operator states where it keeps the data, e.g.
    # "SeaweedFS in our Helsinki DC, ticket OPS-123"; logged at every start.
    region_attestation: str = ""


@dataclass(frozen=True)
class KeysConfig:
    """The master key that wraps each recording's data key (``[store.keys]``)."""

    wrapper: str = "file"
    # Outside data_dir (a backup of the state must not carry the key that opens it);
    # the default is keys/master.key beside the config file (/etc/callrec/keys/…).
    master_key_file: Path = Path("/etc/callrec/keys/master.key")
    # wrapper = "pkcs11": the master keys live in a token (agent.store.keys.pkcs11).
    pkcs11_module: Path | None = None  # e.g. /usr/lib/softhsm/libsofthsm2.so
    pkcs11_token_label: str = "callrec"  # noqa: S105 (the token's label, not a secret)
    pkcs11_pin_file: Path | None = None  # the user PIN, 0600


@dataclass(frozen=True)
class StoreOidcConfig:
    """``[store.oidc]``: the store accepts this issuer's ID tokens (sent by the web for
    the signed-in person) beside personal tokens; ``person_claim`` names the directory
    person."""

    issuer: str
    audience: tuple[str, ...]  # the web's client id
    person_claim: str = "sub"
    jwks_uri: str | None = None  # default: from the issuer's discovery document
    ca_file: Path | None = None  # to trust the issuer's TLS certificate
    leeway_s: float = 30.0


@dataclass(frozen=True)
class StoreConfig:
    listen: str
    data_dir: Path
    catalog_url: str
    retention_months: int = 6
    sweep_interval_s: float = 3600.0
    sweep_batch: int = 1000
    # Who sweeps: "store" (its own loop, every sweep_interval) or "timer"
    # (callrec-sweep.timer; the store's loop is off). Exactly one of them.
    sweep_by: str = "store"
    orphan_grace_s: float = 24 * 3600.0
    region: str = "fi"
    allowed_regions: tuple[str, ...] = DEFAULT_ALLOWED_REGIONS
    blobs: str = "files"
    s3: S3Config | None = None
    keys: KeysConfig = field(default_factory=KeysConfig)
    log_level: str = "info"
    tls: TlsConfig | None = None  # [store.tls]: mutual TLS for agents (the default)
    insecure: bool = False  # [store.tls] insecure = true: plain text, loopback only
    # The Access service (issue 8): the people who may use it (None: service off) and
    # seal.pem, the keyring that opens the sealed digits (to find a data subject's
    # calls, and to unseal). lookup_key_file is obsolete (accepted, warned, unused).
    directory_file: Path | None = None
    lookup_key_file: Path | None = None
    seal_key_file: Path | None = None
    # People's tools reach Access here (TLS with the store's certificate, no client
    # certificate: a person proves who they are with their token). None: Access is
    # served on `listen` beside Ingest, where mutual TLS asks for a client certificate.
    access_listen: str | None = None
    # Bounds on what agents hold open (issue 14): uploads at once and bytes of partial
    # uploads per site, a stream's idle deadline, the age at which a partial upload is
    # removed however recently it grew.
    max_uploads_per_site: int = 16
    max_incoming_bytes_per_site: int = 16 * 1024**3
    upload_idle_timeout_s: float = 60.0
    part_max_age_s: float = 6 * 3600.0
    oidc: StoreOidcConfig | None = None  # [store.oidc]: ID tokens of the people's web
    metrics_listen: str | None = None  # "127.0.0.1:9465": Prometheus /metrics
    # blobs = "files" on a PostgreSQL catalog: the directory every store of the catalog
    # mounts (issue 18; without it such a store is refused: replicas would each keep
    # their own files). None: data_dir/blobs (an SQLite catalog is one store's).
    shared_blobs_dir: Path | None = None
    # Live upload (issue 19): a live call silent this long is finished as incomplete;
    # this many archive encoders (ffmpeg processes) run at once; a call finished so
    # (timed out) keeps its segments this long for a returning agent's tail.
    live_timeout_s: float = 60.0
    live_encoders: int = 2
    live_tail_window_s: float = 3600.0

    @property
    def blobs_dir(self) -> Path:
        return self.shared_blobs_dir or self.data_dir / "blobs"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def master_key_file(self) -> Path:
        return self.keys.master_key_file


def load_store_config(path: Path) -> StoreConfig:
    doc = _load_toml(path)
    return store_config_from_dict(doc, path.resolve().parent)


@_collecting
def store_config_from_dict(doc: Mapping[str, Any], base: Path) -> StoreConfig:
    s = _sections(doc, ("store", "log"), base)
    st = s["store"]
    data_dir = st.path("data_dir", _REQUIRED)
    retention_raw = st._get("retention", "6 months")
    try:
        retention = parse_months(retention_raw)
    except ValueError:
        raise st._fail("retention", retention_raw, 'e.g. "6 months"') from None
    allowed = _allowed_regions(st)
    region = st.text("region", "fi").lower()
    if not region_allowed(region, allowed):
        raise st._fail("region", region, "a region in allowed_regions (EU/EEA by default)")
    blobs = st.text("blobs", "files", choices=("files", "s3"))
    sub = {name: _subsection(st, name, base) for name in ("s3", "keys", "tls", "oidc")}
    if blobs != "s3" and sub["s3"].table:
        raise st._fail("blobs", blobs, '"s3" when a [store.s3] table is given')
    cfg = StoreConfig(
        listen=_listen(st, "listen", "127.0.0.1:50051"),
        data_dir=data_dir,
        catalog_url=st.text("catalog", f"sqlite:///{data_dir / 'catalog.sqlite3'}"),
        retention_months=retention,
        sweep_interval_s=st.seconds("sweep_interval", "1h"),
        sweep_batch=st.integer("sweep_batch", 1000, 1, 10_000),
        sweep_by=st.text("sweep_by", "store", choices=("store", "timer")),
        orphan_grace_s=st.seconds("orphan_grace", "24h"),
        region=region,
        allowed_regions=allowed,
        blobs=blobs,
        s3=_s3_config(sub["s3"], allowed) if blobs == "s3" else None,
        keys=_keys_config(sub["keys"]),
        log_level=s["log"].text("level", "info", choices=LOG_LEVELS),
        **_transport(sub["tls"], _listen(st, "listen", "127.0.0.1:50051"), "[store] listen"),
        directory_file=_optional_path(st, "directory_file"),
        access_listen=(_listen(st, "access_listen", "") if "access_listen" in st.table else None),
        metrics_listen=_listen(st, "metrics", "") if "metrics" in st.table else None,
        lookup_key_file=_optional_path(st, "lookup_key_file"),
        seal_key_file=_optional_path(st, "seal_key_file"),
        max_uploads_per_site=st.integer("max_uploads_per_site", 16, 1, 10_000),
        max_incoming_bytes_per_site=_size(st, "max_incoming_per_site", "16 GiB"),
        upload_idle_timeout_s=st.seconds("upload_idle_timeout", "60s"),
        part_max_age_s=st.seconds("part_max_age", "6h"),
        oidc=_store_oidc_config(sub["oidc"]) if sub["oidc"].table else None,
        shared_blobs_dir=_optional_path(st, "shared_blobs_dir"),
        live_timeout_s=st.seconds("live_timeout", "60s"),
        live_encoders=st.integer("live_encoders", 2, 1, 64),
        live_tail_window_s=st.seconds("live_tail_window", "1h"),
    )
    _check_shared_blobs(st, cfg)
    longest = data_dir / "console.inner.sock"  # the store's unix sockets live in data_dir
    if len(os.fsencode(longest)) > MAX_UNIX_SOCKET_PATH:
        raise st._fail(
            "data_dir",
            str(data_dir),
            f"a shorter path: its socket {longest.name} would pass the "
            f"{MAX_UNIX_SOCKET_PATH} bytes a unix socket's path may hold",
        )
    if cfg.insecure and cfg.access_listen is not None and not is_loopback(cfg.access_listen):
        raise st._fail(
            "access_listen",
            cfg.access_listen,
            "a loopback address while [store.tls] insecure = true (people's tokens would "
            "cross the network in plain text); give [store.tls] certificate files",
        )
    _outside_data_dir(sub["keys"], "master_key_file", cfg.keys.master_key_file, data_dir)
    _outside_data_dir(sub["keys"], "pkcs11_pin_file", cfg.keys.pkcs11_pin_file, data_dir)
    _outside_data_dir(st, "seal_key_file", cfg.seal_key_file, data_dir)
    if not cfg.catalog_url.startswith(("sqlite:///", "postgresql")):
        raise st._fail(
            "catalog", cfg.catalog_url, 'a "sqlite:///…" or "postgresql+psycopg://…" URL'
        )
    for section in (*s.values(), *sub.values()):
        section.check_unknown()
    return cfg


def _check_shared_blobs(st: _Section, cfg: StoreConfig) -> None:
    """A PostgreSQL catalog is shared by every store on it; a store's own blob directory
    is not (another store could not play its recordings, and would audit as destroyed a
    file it cannot see): local files only with a directory they all mount."""
    shared_catalog = cfg.catalog_url.startswith("postgresql")
    if cfg.blobs == "files" and shared_catalog and cfg.shared_blobs_dir is None:
        raise st._fail(
            "blobs",
            cfg.blobs,
            '"s3" with a PostgreSQL catalog, which every store on it shares (or set '
            "shared_blobs_dir to a directory every one of those stores mounts)",
        )
    if cfg.shared_blobs_dir is not None and cfg.blobs != "files":
        raise st._fail("shared_blobs_dir", str(cfg.shared_blobs_dir), 'blobs = "files"')


def _store_oidc_config(oidc: _Section) -> StoreOidcConfig:
    issuer = oidc.text("issuer")
    if not issuer.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise oidc._fail("issuer", issuer, "an https:// URL (http only on loopback)")
    audience = oidc._get("audience", _REQUIRED)
    return StoreOidcConfig(
        issuer=issuer,
        audience=(audience,) if isinstance(audience, str) else oidc.strings("audience", []),
        person_claim=oidc.text("person_claim", "sub"),
        jwks_uri=_optional_text(oidc, "jwks_uri", "") or None,
        ca_file=_optional_path(oidc, "ca_file"),
        leeway_s=oidc.seconds("leeway", "30s"),
    )


def _keys_config(keys: _Section) -> KeysConfig:
    wrapper = keys.text("wrapper", "file", choices=("file", "pkcs11"))
    token = wrapper == "pkcs11"
    return KeysConfig(
        wrapper=wrapper,
        master_key_file=keys.path("master_key_file", "keys/master.key"),
        pkcs11_module=keys.path("pkcs11_module") if token else None,
        pkcs11_token_label=keys.text("pkcs11_token_label", "callrec"),
        pkcs11_pin_file=keys.path("pkcs11_pin_file") if token else None,
    )


def _outside_data_dir(section: _Section, key: str, path: Path | None, data_dir: Path) -> None:
    """Keys never sit in the state they protect: a copy of data_dir (a backup, a
    snapshot) must not carry what opens it."""
    if path is not None and path.resolve().is_relative_to(data_dir.resolve()):
        raise section._fail(
            key,
            str(path),
            f"a path outside data_dir ({data_dir}): a backup of the state "
            "must not carry the key that opens it",
        )


def _allowed_regions(st: _Section) -> tuple[str, ...]:
    allowed = tuple(r.lower() for r in st.strings("allowed_regions", DEFAULT_ALLOWED_REGIONS))
    bad = [r for r in allowed if not valid_region_pattern(r)]
    if not allowed or bad:
        raise st._fail(
            "allowed_regions", list(allowed), 'region names such as "fi" or "eu-north-1"'
        )
    return allowed


def _s3_config(s3: _Section, allowed: tuple[str, ...]) -> S3Config:
    """``[store.s3]``; the declared region and an AWS endpoint's region are checked
    here, the bucket's own region when the store starts."""
    region = s3.text("region").lower()
    if not region_allowed(region, allowed):
        raise s3._fail("region", region, "a region in [store] allowed_regions (EU/EEA)")
    endpoint = _optional_text(s3, "endpoint", "") or None
    if endpoint is not None:
        _check_endpoint(s3, endpoint, region)
    key_id = _optional_text(s3, "access_key_id", "") or None
    secret = (
        s3.path("secret_access_key_file", None) if "secret_access_key_file" in s3.table else None
    )
    if (key_id is None) != (secret is None):
        raise s3._fail("access_key_id", key_id, "access_key_id and secret_access_key_file together")
    mib = 1024 * 1024
    return S3Config(
        bucket=s3.text("bucket"),
        region=region,
        endpoint=endpoint,
        prefix=_optional_text(s3, "prefix", "recordings/"),
        access_key_id=key_id,
        secret_access_key_file=secret,
        multipart_threshold_bytes=s3.integer("multipart_threshold_mb", 64, 5, 5 * 1024) * mib,
        multipart_chunk_bytes=s3.integer("multipart_chunk_mb", 16, 5, 5 * 1024) * mib,
        region_attestation=_optional_text(s3, "region_attestation", ""),
    )


def _check_endpoint(s3: _Section, endpoint: str, region: str) -> None:
    parsed = urlsplit(endpoint)
    host = parsed.hostname or ""
    if parsed.scheme not in ("http", "https") or not host:
        raise s3._fail("endpoint", endpoint, 'a URL such as "https://s3.eu-north-1.amazonaws.com"')
    if is_aws_host(host) and aws_endpoint_region(host) != region:
        raise s3._fail(
            "endpoint",
            endpoint,
            f"an AWS endpoint of the configured region {region!r} "
            f'(e.g. "https://s3.{region}.amazonaws.com")',
        )
