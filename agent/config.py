"""One frozen config per daemon, read from TOML and validated once at start.

Every error names the key and what was expected, e.g.
``[store] retention = "6 monts": expected e.g. "6 months"``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.store.residency import (
    DEFAULT_ALLOWED_REGIONS,
    aws_endpoint_region,
    is_aws_host,
    region_allowed,
    valid_region_pattern,
)

AUDIO_FORMATS = ("opus", "flac", "wav")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class SipConfig:
    listen: str = "127.0.0.1"
    port: int = 5070
    rtp_port_start: int = 40000
    rtp_port_count: int = 200
    workers: int = 1
    rtp_timeout_s: float = 30.0
    max_call_s: float = 4 * 3600.0
    # For plain (non-SIPREC) INVITEs of a forking PBX: headers naming the parties.
    customer_header: str = "X-Callrec-Customer"
    employee_header: str = "X-Callrec-Employee"
    service_header: str = "X-Callrec-Service"


@dataclass(frozen=True)
class PrivacyConfig:
    default_region: str = "FI"
    lookup_key_file: Path = Path("keys/lookup.key")
    seal_public_key_file: Path = Path("keys/seal.pub.pem")


@dataclass(frozen=True)
class AudioConfig:
    format: str = "opus"
    bitrate: str = "24k"


@dataclass(frozen=True)
class UplinkConfig:
    store_address: str = "127.0.0.1:50051"
    chunk_bytes: int = 128 * 1024
    concurrency: int = 2
    rescan_s: float = 30.0
    grace_s: float = 10.0


@dataclass(frozen=True)
class AgentConfig:
    site: str
    data_dir: Path
    directory_file: Path
    service_numbers: tuple[str, ...]
    sip: SipConfig = field(default_factory=SipConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    log_level: str = "info"

    @property
    def captures_dir(self) -> Path:
        return self.data_dir / "captures"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"


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
    master_key_file: Path | None = None  # None: <data_dir>/keys/master.key


@dataclass(frozen=True)
class StoreConfig:
    listen: str
    data_dir: Path
    catalog_url: str
    retention_months: int = 6
    sweep_interval_s: float = 3600.0
    sweep_batch: int = 200
    orphan_grace_s: float = 24 * 3600.0
    region: str = "fi"
    allowed_regions: tuple[str, ...] = DEFAULT_ALLOWED_REGIONS
    blobs: str = "files"
    s3: S3Config | None = None
    keys: KeysConfig = field(default_factory=KeysConfig)
    log_level: str = "info"
    # The Access service (issue 8): the people who may use it (None: service off), the
    # lookup keys that find a data subject's calls, and seal.pem for the sealed digits.
    directory_file: Path | None = None
    lookup_key_file: Path | None = None
    seal_key_file: Path | None = None

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def master_key_file(self) -> Path:
        return self.keys.master_key_file or self.data_dir / "keys" / "master.key"


# ---------------------------------------------------------------- parsing helpers

_REQUIRED: object = object()


class _Section:
    """Typed reads from one TOML table, remembering which keys were used."""

    def __init__(self, name: str, table: Mapping[str, Any], base: Path) -> None:
        self.name = name
        self.table = table
        self.base = base
        self.used: set[str] = set()

    def _fail(self, key: str, value: object, expected: str) -> ConfigError:
        return ConfigError(f"[{self.name}] {key} = {value!r}: expected {expected}")

    def _get(self, key: str, default: object) -> object:
        self.used.add(key)
        if key not in self.table:
            if default is _REQUIRED:
                raise ConfigError(f"[{self.name}] {key}: missing, this key is required")
            return default
        return self.table[key]

    def text(self, key: str, default: object = _REQUIRED, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise self._fail(key, value, "a non-empty string")
        if choices and value not in choices:
            raise self._fail(key, value, "one of " + ", ".join(choices))
        return value

    def integer(self, key: str, default: object, lo: int, hi: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(key, value, f"an integer from {lo} to {hi}")
        return value

    def seconds(self, key: str, default: object) -> float:
        value = self._get(key, default)
        try:
            return parse_duration(value)
        except ValueError:
            raise self._fail(key, value, 'a duration such as "30s", "5m" or "2h"') from None

    def path(self, key: str, default: object = _REQUIRED) -> Path:
        value = self._get(key, default)
        if isinstance(value, Path):
            return value if value.is_absolute() else self.base / value
        if not isinstance(value, str) or not value:
            raise self._fail(key, value, "a file or directory path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def strings(self, key: str, default: object) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise self._fail(key, value, "a list of strings")
        return tuple(value)

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"[{self.name}] {unknown[0]}: unknown key")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, None: 1.0}
_MONTHS = re.compile(r"^\s*(\d+)\s*months?\s*$")


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"2h"``, ``"250ms"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(value)
    if seconds <= 0:
        raise ValueError(value)
    return seconds


def parse_months(value: object) -> int:
    """``"6 months"`` → 6."""
    if isinstance(value, str) and (match := _MONTHS.match(value)):
        months = int(match.group(1))
        if 1 <= months <= 120:
            return months
    raise ValueError(value)


def _listen(section: _Section, key: str, default: str) -> str:
    value = section.text(key, default)
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = bool(sep) and 0 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise section._fail(key, value, 'an address and port such as "127.0.0.1:50051"')
    return value


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _sections(doc: Mapping[str, Any], allowed: tuple[str, ...], base: Path) -> dict[str, _Section]:
    for name, table in doc.items():
        if name not in allowed:
            raise ConfigError(f"[{name}]: unknown section (expected one of {', '.join(allowed)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{name} = {table!r}: expected a [{name}] table")
    return {name: _Section(name, doc.get(name, {}), base) for name in allowed}


# ---------------------------------------------------------------- agent


def load_agent_config(path: Path) -> AgentConfig:
    doc = _load_toml(path)
    return agent_config_from_dict(doc, path.resolve().parent)


def agent_config_from_dict(doc: Mapping[str, Any], base: Path) -> AgentConfig:
    s = _sections(
        doc, ("agent", "sip", "privacy", "audio", "uplink", "directory", "calls", "log"), base
    )
    a, sip, pr, au, up = s["agent"], s["sip"], s["privacy"], s["audio"], s["uplink"]
    site = a.text("site", _REQUIRED)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", site):
        raise a._fail("site", site, "lower-case letters, digits and '-' (e.g. \"hel-1\")")
    sip_cfg = SipConfig(
        listen=sip.text("listen", "127.0.0.1"),
        port=sip.integer("port", 5070, 1, 65535),
        rtp_port_start=sip.integer("rtp_port_start", 40000, 1024, 65000),
        rtp_port_count=sip.integer("rtp_port_count", 200, 8, 20000),
        workers=sip.integer("workers", 1, 1, 256),
        rtp_timeout_s=sip.seconds("rtp_timeout", "30s"),
        max_call_s=sip.seconds("max_call", "4h"),
        customer_header=sip.text("customer_header", SipConfig.customer_header),
        employee_header=sip.text("employee_header", SipConfig.employee_header),
        service_header=sip.text("service_header", SipConfig.service_header),
    )
    try:
        ipaddress.ip_address(sip_cfg.listen)
    except ValueError:
        raise sip._fail("listen", sip_cfg.listen, "an IP address") from None
    cfg = AgentConfig(
        site=site,
        data_dir=a.path("data_dir", _REQUIRED),
        directory_file=s["directory"].path("file", _REQUIRED),
        service_numbers=s["calls"].strings("service_numbers", _REQUIRED),
        sip=sip_cfg,
        privacy=PrivacyConfig(
            default_region=pr.text("default_region", "FI").upper(),
            lookup_key_file=pr.path("lookup_key_file", _REQUIRED),
            seal_public_key_file=pr.path("seal_public_key_file", _REQUIRED),
        ),
        audio=AudioConfig(
            format=au.text("format", "opus", choices=AUDIO_FORMATS),
            bitrate=au.text("bitrate", "24k"),
        ),
        uplink=UplinkConfig(
            store_address=up.text("store_address", "127.0.0.1:50051"),
            chunk_bytes=up.integer("chunk_bytes", 128 * 1024, 64 * 1024, 256 * 1024),
            concurrency=up.integer("concurrency", 2, 1, 32),
            rescan_s=up.seconds("rescan", "30s"),
            grace_s=up.seconds("grace", "10s"),
        ),
        log_level=s["log"].text("level", "info", choices=LOG_LEVELS),
    )
    if not re.fullmatch(r"\d+k", cfg.audio.bitrate):
        raise au._fail("bitrate", cfg.audio.bitrate, 'a bitrate such as "24k"')
    for section in s.values():
        section.check_unknown()
    return cfg


# ---------------------------------------------------------------- store


def load_store_config(path: Path) -> StoreConfig:
    doc = _load_toml(path)
    return store_config_from_dict(doc, path.resolve().parent)


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
    sub = {name: _subsection(st, name, base) for name in ("s3", "keys")}
    if blobs != "s3" and sub["s3"].table:
        raise st._fail("blobs", blobs, '"s3" when a [store.s3] table is given')
    cfg = StoreConfig(
        listen=_listen(st, "listen", "127.0.0.1:50051"),
        data_dir=data_dir,
        catalog_url=st.text("catalog", f"sqlite:///{data_dir / 'catalog.sqlite3'}"),
        retention_months=retention,
        sweep_interval_s=st.seconds("sweep_interval", "1h"),
        sweep_batch=st.integer("sweep_batch", 200, 1, 10_000),
        orphan_grace_s=st.seconds("orphan_grace", "24h"),
        region=region,
        allowed_regions=allowed,
        blobs=blobs,
        s3=_s3_config(sub["s3"], allowed) if blobs == "s3" else None,
        keys=_keys_config(sub["keys"]),
        log_level=s["log"].text("level", "info", choices=LOG_LEVELS),
        directory_file=_optional_path(st, "directory_file"),
        lookup_key_file=_optional_path(st, "lookup_key_file"),
        seal_key_file=_optional_path(st, "seal_key_file"),
    )
    if not cfg.catalog_url.startswith(("sqlite:///", "postgresql")):
        raise st._fail(
            "catalog", cfg.catalog_url, 'a "sqlite:///…" or "postgresql+psycopg://…" URL'
        )
    for section in (*s.values(), *sub.values()):
        section.check_unknown()
    return cfg


def _optional_path(section: _Section, key: str) -> Path | None:
    return section.path(key) if key in section.table else None


def _subsection(parent: _Section, name: str, base: Path) -> _Section:
    table = parent._get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"[{parent.name}] {name} = {table!r}: expected a [{parent.name}.{name}] table"
        )
    return _Section(f"{parent.name}.{name}", table, base)


def _keys_config(keys: _Section) -> KeysConfig:
    path = keys.path("master_key_file") if "master_key_file" in keys.table else None
    return KeysConfig(wrapper=keys.text("wrapper", "file", choices=("file",)), master_key_file=path)


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


def _optional_text(section: _Section, key: str, default: str) -> str:
    value = section._get(key, default)
    if not isinstance(value, str):
        raise section._fail(key, value, "a string")
    return value


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
