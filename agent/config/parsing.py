"""Reading a TOML config file: typed reads of one table that name the key and what was
expected, every wrong key of a file collected into one error, durations, sizes, listen
addresses and TLS files. Shared by the agent's and the store's loaders here, the web's
(``agent.web.config``) and the people's CLI profile (``agent.client.profile``)."""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from agent.config import reference as config_reference

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS between agent and store: our CA, this end's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


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
        (``agent.config.reference``): a key exists only once it is documented."""
        accepted = self.used & config_reference.documented(self.name)
        unknown = sorted(set(self.table) - accepted)
        errors = _collected.get()
        for key in unknown:
            message = f"[{self.name}] {key}: unknown key"
            if key in self.used:
                message += " (read but undocumented: add it to agent/config/reference.py)"
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


def tls_files(section: _Section) -> TlsConfig | None:
    """``ca_file``, ``cert_file`` and ``key_file``: all three, or none (None)."""
    given = [key for key in _TLS_KEYS if key in section.table]
    if given and len(given) < len(_TLS_KEYS):
        missing = next(key for key in _TLS_KEYS if key not in given)
        raise ConfigError(
            f"[{section.name}] {missing}: missing; ca_file, cert_file and key_file go together"
        )
    return TlsConfig(*(section.path(key) for key in _TLS_KEYS)) if given else None


def _transport(section: _Section, address: str, address_key: str) -> dict[str, Any]:
    """TLS files (all three or none) and ``insecure``, which only a loopback address may
    have; whether one of the two is set is checked when the daemon starts
    (``check_transport``)."""
    insecure = section.boolean("insecure", False)
    tls = tls_files(section)
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


def _optional_path(section: _Section, key: str) -> Path | None:
    return section.path(key, None) if key in section.table else None


def _subsection(parent: _Section, name: str, base: Path) -> _Section:
    table = parent._get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(
            f"[{parent.name}] {name} = {toml_value(table)}: expected a [{parent.name}.{name}] table"
        )
    return _Section(f"{parent.name}.{name}", table, base)


def _optional_text(section: _Section, key: str, default: str) -> str:
    value = section._get(key, default)
    if not isinstance(value, str):
        raise section._fail(key, value, "a string")
    return value
