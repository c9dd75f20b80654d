"""The recording agent's config (``agent.toml``): ``[agent]``, ``[privacy]``,
``[audio]``, ``[uplink]``, ``[directory]``, ``[calls]``, ``[log]``, ``[spool]``,
``[control]``; ``[sip]`` is read by ``agent.config.sip``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.parsing import (
    _REQUIRED,
    LOG_LEVELS,
    ConfigError,
    TlsConfig,
    _collecting,
    _listen,
    _load_toml,
    _optional_path,
    _Section,
    _sections,
    _size,
    _transport,
    is_loopback,
    tls_files,
)
from agent.config.sip import SipConfig, _sip_config

if TYPE_CHECKING:
    from agent.config.store import StoreConfig


AUDIO_FORMATS = ("opus", "flac", "wav")


@dataclass(frozen=True)
class PrivacyConfig:
    default_region: str = "FI"
    seal_public_key_file: Path = Path("keys/seal.pub.pem")
    # Obsolete: agents no longer hold a lookup key. Accepted so that an upgraded agent
    # still starts (and records); it warns and never reads the file.
    lookup_key_file: Path | None = None


@dataclass(frozen=True)
class AudioConfig:
    format: str = "opus"
    bitrate: str = "24k"
    workers: int = 0  # finalize threads (one encoder each); 0 = one per CPU core


@dataclass(frozen=True)
class UplinkConfig:
    store_address: str = "127.0.0.1:50051"
    chunk_bytes: int = 256 * 1024
    concurrency: int = 2
    rescan_s: float = 30.0
    grace_s: float = 10.0
    backoff_max_s: float = 30.0
    # Mutual TLS (the default); plain text only with insecure = true on loopback.
    tls: TlsConfig | None = None
    insecure: bool = False
    # Backpressure: past either limit the agent warns every check (and keeps recording).
    outbox_warn_bytes: int = 2 * 1024**3
    outbox_warn_age_s: float = 3600.0
    outbox_check_s: float = 30.0
    # While the store is unreachable: one line when that starts and ends, a summary
    # at most this often in between.
    store_down_summary_s: float = 300.0
    # Live upload (issue 19): SIPREC and plain calls stream to the store while they run
    # (agent.recorder.uplink.live), flushed every live_flush; spool pickups keep the file path.
    live: bool = False
    live_flush_s: float = 1.0
    # How the legs travel (agent.g711): "alaw" (half of PCM's bytes; sent only to a
    # store that takes it) or "pcm" (the samples bit for bit, e.g. for a µ-law SRC).
    live_encoding: str = "alaw"


@dataclass(frozen=True)
class SpoolConfig:
    """Pick up recordings the PBX made itself (``[spool]``; see agent.recorder.spool.pickup)."""

    dir: Path
    owned: bool = False  # delete the PBX's files once the recording is in the outbox
    settle_s: float = 2.0  # a file unwritten this long (and closed) is complete
    orphan_timeout_s: float = 600.0  # a sidecar without its audio (or audio without one)
    rescan_s: float = 30.0


@dataclass(frozen=True)
class ControlConfig:
    """The recording control API (``[control]``; see agent.recorder.control.api):
    integrations authenticate with a token (``tokens_file``: ``<name> <sha256 hex>``
    per line, hashed at rest) and/or a client certificate of ``ca_file``'s CA (mutual
    TLS, ``cert_file``/``key_file`` the agent's own)."""

    listen: str = "127.0.0.1:8470"
    tokens_file: Path | None = None
    tls: TlsConfig | None = None


@dataclass(frozen=True)
class FreeSpaceFloor:
    """``[agent] min_free``: the free space on the data disk below which new calls are
    refused (503) before anything is answered; calls in progress go on. A size
    (``"2 GiB"``, the default) or a share of the file system (``"5%"``)."""

    bytes: int = 2 * 1024**3
    percent: float = 0.0

    def floor(self, total_bytes: int) -> int:
        """The floor in bytes on a file system of ``total_bytes``."""
        return max(self.bytes, int(total_bytes * self.percent / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.bytes} bytes"


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
    spool: SpoolConfig | None = None  # no [spool] section: no spool pickup
    metrics_listen: str | None = None  # "127.0.0.1:9464": Prometheus /metrics
    min_free: FreeSpaceFloor = field(default_factory=FreeSpaceFloor)
    quarantine_max_age_s: float = 30 * 86400.0  # then the agent deletes the entry
    control: ControlConfig | None = None  # no [control] section: no control API

    @property
    def captures_dir(self) -> Path:
        return self.data_dir / "captures"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"


def load_agent_config(path: Path) -> AgentConfig:
    doc = _load_toml(path)
    return agent_config_from_dict(doc, path.resolve().parent)


AGENT_SECTIONS = (
    "agent", "sip", "privacy", "audio", "uplink", "directory", "calls", "log", "spool", "control",
)  # fmt: skip


@_collecting
def agent_config_from_dict(doc: Mapping[str, Any], base: Path) -> AgentConfig:
    s = _sections(doc, AGENT_SECTIONS, base)
    a, sip, pr, au, up = s["agent"], s["sip"], s["privacy"], s["audio"], s["uplink"]
    site = a.text("site", _REQUIRED)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", site):
        raise a._fail("site", site, "lower-case letters, digits and '-' (e.g. \"hel-1\")")
    sip_cfg = _sip_config(sip)
    cfg = AgentConfig(
        site=site,
        data_dir=a.path("data_dir", _REQUIRED),
        directory_file=s["directory"].path("file", _REQUIRED),
        service_numbers=s["calls"].strings("service_numbers", _REQUIRED),
        sip=sip_cfg,
        privacy=PrivacyConfig(
            default_region=pr.text("default_region", "FI").upper(),
            seal_public_key_file=pr.path("seal_public_key_file", _REQUIRED),
            lookup_key_file=_optional_path(pr, "lookup_key_file"),
        ),
        audio=AudioConfig(
            format=au.text("format", "opus", choices=AUDIO_FORMATS),
            bitrate=au.text("bitrate", "24k"),
            workers=au.integer("workers", 0, 0, 64),
        ),
        uplink=_uplink_config(up),
        log_level=s["log"].text("level", "info", choices=LOG_LEVELS),
        spool=_spool_config(s["spool"]) if "spool" in doc else None,
        metrics_listen=_listen(a, "metrics", "") if "metrics" in a.table else None,
        min_free=_free_space_floor(a, "min_free"),
        quarantine_max_age_s=_quarantine_max_age(a),
        control=_control_config(s["control"]) if "control" in doc else None,
    )
    if not re.fullmatch(r"\d+k", cfg.audio.bitrate):
        raise au._fail("bitrate", cfg.audio.bitrate, 'a bitrate such as "24k"')
    for section in s.values():
        section.check_unknown()
    return cfg


def _control_config(c: _Section) -> ControlConfig:
    """``[control]``: tokens and/or mutual TLS; tokens travel in clear text only on a
    loopback address."""
    listen = _listen(c, "listen", ControlConfig.listen)
    tls = tls_files(c)
    cfg = ControlConfig(listen=listen, tokens_file=_optional_path(c, "tokens_file"), tls=tls)
    if cfg.tokens_file is None and tls is None:
        raise ConfigError(
            "[control] tokens_file: missing; the control API needs tokens "
            "(`callrec control token NAME --tokens-file FILE`) and/or mutual TLS "
            "(ca_file, cert_file, key_file)"
        )
    if tls is None and not is_loopback(listen):
        raise c._fail("listen", listen, "a loopback address, or ca_file/cert_file/key_file for TLS")
    return cfg


def _spool_config(sp: _Section) -> SpoolConfig:
    cfg = SpoolConfig(
        dir=sp.path("dir", _REQUIRED),
        owned=sp.boolean("owned", False),
        settle_s=sp.seconds("settle", "2s"),
        orphan_timeout_s=sp.seconds("orphan_timeout", "10m"),
        rescan_s=sp.seconds("rescan", "30s"),
    )
    if cfg.orphan_timeout_s <= cfg.settle_s:
        raise sp._fail(
            "orphan_timeout", sp.table.get("orphan_timeout"), "a duration longer than settle"
        )
    return cfg


def _quarantine_max_age(a: _Section) -> float:
    """Quarantined recordings hold personal data: gone well within the retention."""
    value = a.seconds("quarantine_max_age", "30d")
    if not 3600 <= value <= 183 * 86400:
        raise a._fail("quarantine_max_age", a.table["quarantine_max_age"], 'from "1h" to "183d"')
    return value


def _uplink_config(up: _Section) -> UplinkConfig:
    address = up.text("store_address", "127.0.0.1:50051")
    return UplinkConfig(
        store_address=address,
        chunk_bytes=up.integer("chunk_bytes", 256 * 1024, 64 * 1024, 256 * 1024),
        concurrency=up.integer("concurrency", 2, 1, 32),
        rescan_s=up.seconds("rescan", "30s"),
        grace_s=up.seconds("grace", "10s"),
        backoff_max_s=up.seconds("backoff_max", "30s"),
        outbox_warn_bytes=_size(up, "outbox_warn_bytes", "2 GiB"),
        outbox_warn_age_s=up.seconds("outbox_warn_age", "1h"),
        outbox_check_s=up.seconds("outbox_check", "30s"),
        store_down_summary_s=up.seconds("store_down_summary", "5m"),
        live=up.boolean("live", False),
        live_flush_s=_live_flush(up),
        live_encoding=up.text("live_encoding", "alaw", choices=("alaw", "pcm")),
        **_transport(up, address, "store_address"),
    )


def _live_flush(up: _Section) -> float:
    """The store holds a live call's audio at most this far behind (the issue: 2 s)."""
    value = up.seconds("live_flush", "1s")
    if not 0.1 <= value <= 2.0:
        raise up._fail("live_flush", up.table["live_flush"], 'from "100ms" to "2s"')
    return value


def check_transport(cfg: UplinkConfig | StoreConfig) -> None:
    """Refuse to start without mutual TLS unless plain text was asked for explicitly."""
    if cfg.tls is not None or cfg.insecure:
        return
    section = "[uplink]" if isinstance(cfg, UplinkConfig) else "[store.tls]"
    raise ConfigError(
        f"{section} ca_file, cert_file, key_file: missing; agent and store talk mutual TLS "
        "(make a CA and certificates with `callrec certs`), or set insecure = true for a "
        "loopback-only test install"
    )


def _free_space_floor(section: _Section, key: str) -> FreeSpaceFloor:
    """``"2 GiB"`` (a size) or ``"5%"`` (of the file system, 0-90 %)."""
    value = section._get(key, "2 GiB")
    if isinstance(value, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)):
        percent = float(match.group(1))
        if 0 < percent <= 90:
            return FreeSpaceFloor(bytes=0, percent=percent)
        raise section._fail(key, value, 'a share from "0.1%" to "90%", or a size such as "2 GiB"')
    try:
        return FreeSpaceFloor(bytes=_size(section, key, "2 GiB"))
    except ConfigError:
        raise section._fail(key, value, 'a size such as "2 GiB" or a share such as "5%"') from None
