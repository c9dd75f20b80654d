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
class StoreConfig:
    listen: str
    data_dir: Path
    catalog_url: str
    retention_months: int = 6
    sweep_interval_s: float = 3600.0
    log_level: str = "info"

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"


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
    cfg = StoreConfig(
        listen=_listen(st, "listen", "127.0.0.1:50051"),
        data_dir=data_dir,
        catalog_url=st.text("catalog", f"sqlite:///{data_dir / 'catalog.sqlite3'}"),
        retention_months=retention,
        sweep_interval_s=st.seconds("sweep_interval", "1h"),
        log_level=s["log"].text("level", "info", choices=LOG_LEVELS),
    )
    if not cfg.catalog_url.startswith(("sqlite:///", "postgresql")):
        raise st._fail(
            "catalog", cfg.catalog_url, 'a "sqlite:///…" or "postgresql+psycopg://…" URL'
        )
    for section in s.values():
        section.check_unknown()
    return cfg
