"""One frozen config per daemon, read from TOML and validated once at start.

Every error names the key and what was expected, e.g.
``[store] retention = "6 monts": expected e.g. "6 months"``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

from agent import config_reference
from agent.store.archive.residency import (
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


WORKER_MAX_CALLS = 4  # PJSUA_MAX_CALLS of the pjsua2 wheel: a fifth INVITE gets 486
LOOPBACK_CLIENTS = ("127.0.0.0/8", "::1/128")
MAX_SIP_MESSAGE = 65536  # the front refuses larger requests with 513


@dataclass(frozen=True)
class SipClient:
    """``[[sip.clients]]``: where one recording client (an SRC at ``address``, an
    address or network) names what its metadata may leave out. ``service_header``: a
    header whose URI gives the service line (``P-Called-Party-ID``, ``Diversion``…);
    ``service_number``: a fixed service line for every call of this client;
    ``employee_header``: a header whose URI names the employee (SIPREC calls too)."""

    address: str
    service_header: str | None = None
    service_number: str | None = None
    employee_header: str | None = None

    def matches(self, ip: str) -> bool:
        try:
            return ipaddress.ip_address(ip) in ipaddress.ip_network(self.address)
        except ValueError:
            return False


@dataclass(frozen=True)
class SipConfig:
    """``[sip]``. The public SIP address is ``listen:port``: the Kamailio front's when
    ``front`` is on (workers then listen on ``worker_listen:worker_port + i``), else
    worker ``i``'s own (``port + i``). Workers always bind RTP on ``listen`` (media
    bypasses the front), worker ``i`` on ``rtp_port_start + i * rtp_port_count``."""

    listen: str = "127.0.0.1"
    port: int = 5070
    rtp_port_start: int = 40000
    rtp_port_count: int = 200
    workers: int = 1
    rtp_timeout_s: float = 30.0
    max_call_s: float = 4 * 3600.0
    drain_s: float = 60.0  # at shutdown, calls in progress may run this long, then BYE
    # "fork": workers are forked from one pre-imported process, whose heap they share
    # (agent.recorder.zygote); "exec": each worker starts and imports its own Python.
    worker_start: str = "fork"
    # pjmedia's own thread reads RTP (polling every 10 ms, calls or not); false: the
    # worker's one pjsua thread does, sleeping until a packet comes (idle: 4x cheaper).
    media_thread: bool = True
    # For plain (non-SIPREC) INVITEs of a forking PBX: headers naming the parties.
    customer_header: str = "X-Callrec-Customer"
    employee_header: str = "X-Callrec-Employee"
    service_header: str = "X-Callrec-Service"
    direction_header: str = "X-Callrec-Direction"
    # The SIP front (Kamailio dispatcher, agent.recorder.front.kamailio).
    front: bool = False
    run_front: bool = False  # the agent runs Kamailio itself (tests, development)
    worker_listen: str = "127.0.0.1"
    worker_port: int = 5071
    kamailio: Path = Path("/usr/sbin/kamailio")
    probe_interval_s: float = 2.0
    # The SIP edge: who may create a recording, and how.
    allowed_clients: tuple[str, ...] = LOOPBACK_CLIENTS  # networks, normalised
    plain: bool = False  # accept plain (non-SIPREC) INVITEs with X-Callrec-* headers
    clients: tuple[SipClient, ...] = ()
    # The front keeps INVITEs' metadata aside; workers fetch it here (loopback HTTP).
    front_http_port: int = 5069
    max_message_bytes: int = MAX_SIP_MESSAGE
    # SIP over TLS at the front (Kamailio's tls module), client certificates required.
    tls_port: int | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None  # the CA that signs the recording clients' certificates

    def allows(self, ip: str) -> bool:
        """``ip`` is a listed recording client (``allowed_clients`` or a ``[[sip.clients]]``)."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        networks = (*self.allowed_clients, *(c.address for c in self.clients))
        return any(address in ipaddress.ip_network(net) for net in networks)

    def client(self, ip: str) -> SipClient | None:
        """The ``[[sip.clients]]`` entry for a source address (the first that matches)."""
        return next((c for c in self.clients if c.matches(ip)), None)

    def worker_sip(self, index: int) -> tuple[str, int]:
        """The SIP address worker ``index`` listens on."""
        if self.front:
            return self.worker_listen, self.worker_port + index
        return self.listen, self.port + index

    def worker_rtp(self, index: int) -> tuple[int, int]:
        """(first port, count) of worker ``index``'s RTP range on ``listen``."""
        return self.rtp_port_start + index * self.rtp_port_count, self.rtp_port_count


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
class TlsConfig:
    """Mutual TLS between agent and store: our CA, this end's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


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


# ---------------------------------------------------------------- parsing helpers

_REQUIRED: object = object()


_P = ParamSpec("_P")
_T = TypeVar("_T")
# The errors of the config being loaded (set by @_collecting): a bad typed read is noted
# here and the load goes on with a stand-in, so one run names every wrong key.
_collected: ContextVar[list[str] | None] = ContextVar("config_errors", default=None)
# Every read of the configs loaded inside ``tracing_reads`` (the reference's test).
_traced: ContextVar[list[KeyRead] | None] = ContextVar("config_reads", default=None)


@dataclass(frozen=True)
class KeyRead:
    """One key a loader read: its documented section, and the default it passed."""

    section: str
    key: str
    default: object
    required: bool


@contextmanager
def tracing_reads() -> Iterator[list[KeyRead]]:
    """Collect every key the loaders read (given or not) while the block runs."""
    reads: list[KeyRead] = []
    token = _traced.set(reads)
    try:
        yield reads
    finally:
        _traced.reset(token)


def toml_value(value: object) -> str:
    """A value as it is written in TOML (``true``, ``"6 monts"``, ``[1, 2]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def _collecting(load: Callable[_P, _T]) -> Callable[_P, _T]:
    """Run a loader noting every bad key; raise one ConfigError naming them all."""

    @functools.wraps(load)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        errors: list[str] = []
        token = _collected.set(errors)
        try:
            return load(*args, **kwargs)
        except ConfigError as exc:
            errors.append(str(exc))
            raise
        except Exception:
            if not errors:
                raise
            raise ConfigError("") from None  # a stand-in's consequence; reported below
        finally:
            _collected.reset(token)
            if errors:
                unique = [e for i, e in enumerate(errors) if e and e not in errors[:i]]
                if len(unique) > 1:
                    unique.insert(0, f"{len(unique)} config errors:")
                raise ConfigError("\n".join(unique)) from None

    return run


class _Section:
    """Typed reads from one TOML table, remembering which keys were used."""

    def __init__(self, name: str, table: Mapping[str, Any], base: Path) -> None:
        self.name = name
        self.table = table
        self.base = base
        self.used: set[str] = set()

    def _fail(self, key: str, value: object, expected: str) -> ConfigError:
        return ConfigError(f"[{self.name}] {key} = {toml_value(value)}: expected {expected}")

    def _bad(self, key: str, value: object, expected: str, stand_in: _T) -> _T:
        """Note a bad value (raise it when no loader collects) and go on with a stand-in."""
        errors = _collected.get()
        if errors is None:
            raise self._fail(key, value, expected)
        errors.append(str(self._fail(key, value, expected)))
        return stand_in

    def _get(self, key: str, default: object) -> object:
        self.used.add(key)
        if (reads := _traced.get()) is not None:
            section = config_reference.section_of(self.name)
            reads.append(KeyRead(section, key, default, default is _REQUIRED))
        if key not in self.table:
            if default is _REQUIRED:
                raise ConfigError(f"[{self.name}] {key}: missing, this key is required")
            return default
        return self.table[key]

    def text(self, key: str, default: object = _REQUIRED, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key, default)
        stand_in = default if isinstance(default, str) else (choices or ("-",))[0]
        if not isinstance(value, str) or not value:
            return self._bad(key, value, "a non-empty string", stand_in)
        if choices and value not in choices:
            return self._bad(key, value, "one of " + ", ".join(choices), stand_in)
        return value

    def integer(self, key: str, default: object, lo: int, hi: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            stand_in = default if isinstance(default, int) else lo
            return self._bad(key, value, f"an integer from {lo} to {hi}", stand_in)
        return value

    def seconds(self, key: str, default: object) -> float:
        value = self._get(key, default)
        try:
            return parse_duration(value)
        except ValueError:
            stand_in = parse_duration(default) if isinstance(default, int | float | str) else 1.0
            return self._bad(key, value, 'a duration such as "30s", "5m" or "2h"', stand_in)

    def path(self, key: str, default: object = _REQUIRED) -> Path:
        value = self._get(key, default)
        if isinstance(value, Path):
            return value if value.is_absolute() else self.base / value
        if not isinstance(value, str) or not value:
            return self._bad(key, value, "a file or directory path", self.base / f"<{key}>")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            return self._bad(key, value, "true or false", default)
        return value

    def strings(self, key: str, default: object) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            stand_in = tuple(default) if isinstance(default, list | tuple) else ()
            return self._bad(key, value, "a list of strings", stand_in)
        return tuple(value)

    def check_unknown(self) -> None:
        """Refuse keys no loader read, and keys read but missing from the reference
        (``agent.config_reference``): a key exists only once it is documented."""
        accepted = self.used & config_reference.documented(self.name)
        unknown = sorted(set(self.table) - accepted)
        errors = _collected.get()
        for key in unknown:
            message = f"[{self.name}] {key}: unknown key"
            if key in self.used:
                message += " (read but undocumented: add it to agent/config_reference.py)"
            if errors is None:
                raise ConfigError(message)
            errors.append(message)


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*")
_DURATION_UNITS = {
    "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0,
}  # fmt: skip
_MONTHS = re.compile(r"\s*(\d+)\s*months?\s*")


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"2h"``, ``"250ms"`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(value)
    if seconds <= 0:
        raise ValueError(value)
    return seconds


def parse_months(value: object) -> int:
    """``"6 months"`` → 6."""
    if isinstance(value, str) and (match := _MONTHS.fullmatch(value)):
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
    except OSError as exc:
        raise ConfigError(f"{path}: config file can't be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _sections(doc: Mapping[str, Any], allowed: tuple[str, ...], base: Path) -> dict[str, _Section]:
    for name, table in doc.items():
        if name not in allowed:
            raise ConfigError(f"[{name}]: unknown section (expected one of {', '.join(allowed)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{name} = {toml_value(table)}: expected a [{name}] table")
    return {name: _Section(name, doc.get(name, {}), base) for name in allowed}


# ---------------------------------------------------------------- agent


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


def _sip_config(sip: _Section) -> SipConfig:
    port = sip.integer("port", 5070, 1, 65535)
    cfg = SipConfig(
        listen=_ip(sip, "listen", "127.0.0.1"),
        port=port,
        rtp_port_start=sip.integer("rtp_port_start", 40000, 1024, 65000),
        # 4 calls x 2 streams x RTP+RTCP, and pjsua takes more pairs while answering:
        # 16 ports failed the 4th call (measured), so ask for a margin.
        rtp_port_count=sip.integer("rtp_port_count", 200, 32, 20000),
        workers=sip.integer("workers", 1, 1, 256),
        rtp_timeout_s=sip.seconds("rtp_timeout", "30s"),
        max_call_s=sip.seconds("max_call", "4h"),
        drain_s=sip.seconds("drain", "60s"),
        worker_start=sip.text("worker_start", "fork", choices=("fork", "exec")),
        media_thread=sip.boolean("media_thread", True),
        customer_header=sip.text("customer_header", SipConfig.customer_header),
        employee_header=sip.text("employee_header", SipConfig.employee_header),
        service_header=sip.text("service_header", SipConfig.service_header),
        direction_header=sip.text("direction_header", SipConfig.direction_header),
        front=sip.boolean("front", False),
        run_front=sip.boolean("run_front", False),
        worker_listen=_ip(sip, "worker_listen", "127.0.0.1"),
        worker_port=sip.integer("worker_port", min(port + 1, 65535), 1, 65535),
        kamailio=sip.path("kamailio", "/usr/sbin/kamailio"),
        probe_interval_s=sip.seconds("probe_interval", "2s"),
        allowed_clients=_networks(sip, "allowed_clients", list(LOOPBACK_CLIENTS)),
        plain=sip.boolean("plain", False),
        clients=_sip_clients(sip),
        front_http_port=sip.integer("front_http_port", max(port - 1, 1), 1, 65535),
        max_message_bytes=sip.integer("max_message", MAX_SIP_MESSAGE, 4096, MAX_SIP_MESSAGE),
        **_sip_tls(sip),
    )
    _check_sip_ports(sip, cfg)
    if cfg.tls_port is not None and not cfg.front:
        raise sip._fail("tls_port", cfg.tls_port, "front = true (the front terminates TLS)")
    return cfg


def _sip_tls(sip: _Section) -> dict[str, Any]:
    """``tls_port`` and the three files it needs (all or none)."""
    if "tls_port" not in sip.table:
        return {}
    return {
        "tls_port": sip.integer("tls_port", _REQUIRED, 1, 65535),
        "tls_cert_file": sip.path("tls_cert_file"),
        "tls_key_file": sip.path("tls_key_file"),
        "tls_ca_file": sip.path("tls_ca_file"),
    }


def _network(section: _Section, key: str, value: object) -> str:
    try:
        return str(ipaddress.ip_network(value if isinstance(value, str) else "", strict=True))
    except ValueError:
        raise section._fail(
            key, value, 'addresses or networks such as "10.1.2.0/24" or "192.0.2.7"'
        ) from None


def _networks(section: _Section, key: str, default: list[str]) -> tuple[str, ...]:
    values = section.strings(key, default)
    return tuple(_network(section, key, v) for v in values)


def _sip_clients(sip: _Section) -> tuple[SipClient, ...]:
    tables = sip._get("clients", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise sip._fail("clients", tables, "[[sip.clients]] tables")
    clients: list[SipClient] = []
    for index, table in enumerate(tables):
        c = _Section(f"sip.clients.{index}", table, sip.base)
        client = SipClient(
            address=_network(c, "address", c._get("address", _REQUIRED)),
            service_header=_header(c, "service_header"),
            service_number=c.text("service_number") if "service_number" in table else None,
            employee_header=_header(c, "employee_header"),
        )
        if client.service_header and client.service_number:
            raise c._fail("service_number", client.service_number, "no service_header beside it")
        c.check_unknown()
        clients.append(client)
    return tuple(clients)


def _header(section: _Section, key: str) -> str | None:
    if key not in section.table:
        return None
    value = section.text(key)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9!#$%&'*+.^_`|~-]{0,63}", value):
        raise section._fail(key, value, 'a SIP header name such as "P-Called-Party-ID"')
    return value


def _ip(section: _Section, key: str, default: str) -> str:
    value = section.text(key, default)
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise section._fail(key, value, "an IP address") from None
    return value


def _check_sip_ports(sip: _Section, cfg: SipConfig) -> None:
    """Worker SIP ports and RTP ranges fit below 65536 and clash with nothing."""
    address = cfg.worker_sip(0)[0]
    last = cfg.worker_sip(cfg.workers - 1)[1]
    if last > 65535:
        key = "worker_port" if cfg.front else "port"
        raise sip._fail(key, last - cfg.workers + 1, f"room for {cfg.workers} worker ports")
    if cfg.front and address == cfg.listen and cfg.worker_port <= cfg.port <= last:
        raise sip._fail("worker_port", cfg.worker_port, f"ports that exclude port {cfg.port}")
    rtp_end = cfg.worker_rtp(cfg.workers - 1)[0] + cfg.rtp_port_count - 1
    if rtp_end > 65535:
        raise sip._fail(
            "rtp_port_start", cfg.rtp_port_start, f"room for {cfg.workers} RTP ranges below 65536"
        )
    sip_ports = range(cfg.worker_sip(0)[1], last + 1)
    if cfg.front and (cfg.front_http_port in sip_ports or cfg.front_http_port == cfg.port):
        raise sip._fail(
            "front_http_port", cfg.front_http_port, "a port apart from the SIP and worker ports"
        )
    if cfg.rtp_port_start <= max(sip_ports) and min(sip_ports) <= rtp_end:
        raise sip._fail("rtp_port_start", cfg.rtp_port_start, "RTP ranges apart from SIP ports")


def _control_config(c: _Section) -> ControlConfig:
    """``[control]``: tokens and/or mutual TLS; tokens travel in clear text only on a
    loopback address."""
    listen = _listen(c, "listen", ControlConfig.listen)
    given = [key for key in _TLS_KEYS if key in c.table]
    if given and len(given) < len(_TLS_KEYS):
        missing = next(key for key in _TLS_KEYS if key not in given)
        raise ConfigError(
            f"[control] {missing}: missing; ca_file, cert_file and key_file go together"
        )
    tls = TlsConfig(*(c.path(key) for key in _TLS_KEYS)) if given else None
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


# ---------------------------------------------------------------- store


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
        **_transport(up, address, "store_address"),
    )


def _live_flush(up: _Section) -> float:
    """The store holds a live call's audio at most this far behind (the issue: 2 s)."""
    value = up.seconds("live_flush", "1s")
    if not 0.1 <= value <= 2.0:
        raise up._fail("live_flush", up.table["live_flush"], 'from "100ms" to "2s"')
    return value


_TLS_KEYS = ("ca_file", "cert_file", "key_file")


def is_loopback(address: str) -> bool:
    """``127.0.0.1:50051``, ``[::1]:50051``, ``localhost:50051``."""
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _transport(section: _Section, address: str, address_key: str) -> dict[str, Any]:
    """TLS files (all three or none) and ``insecure``, which only a loopback address may
    have; whether one of the two is set is checked when the daemon starts
    (``check_transport``)."""
    insecure = section.boolean("insecure", False)
    given = [key for key in _TLS_KEYS if key in section.table]
    if given and len(given) < len(_TLS_KEYS):
        missing = next(key for key in _TLS_KEYS if key not in given)
        raise ConfigError(
            f"[{section.name}] {missing}: missing; ca_file, cert_file and key_file go together"
        )
    tls = TlsConfig(*(section.path(key) for key in _TLS_KEYS)) if given else None
    if insecure and tls is not None:
        raise section._fail("insecure", insecure, "false when ca_file/cert_file/key_file are set")
    if insecure and not is_loopback(address):
        raise section._fail(
            "insecure",
            insecure,
            f"false: plain-text gRPC is allowed only on a loopback address ({address_key} = "
            f"{address!r}); use mutual TLS (`callrec certs`)",
        )
    return {"tls": tls, "insecure": insecure}


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


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})


def _size(section: _Section, key: str, default: object) -> int:
    """A byte count: ``500000000``, ``"500 MB"`` or ``"2 GiB"``."""
    value = section._get(key, default)
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if match and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise section._fail(key, value, 'a size such as "2 GiB", "500 MB" or a number of bytes')


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


def _optional_path(section: _Section, key: str) -> Path | None:
    return section.path(key, None) if key in section.table else None


def _subsection(parent: _Section, name: str, base: Path) -> _Section:
    table = parent._get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"[{parent.name}] {name} = {toml_value(table)}: expected a [{parent.name}.{name}] table"
        )
    return _Section(f"{parent.name}.{name}", table, base)


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
