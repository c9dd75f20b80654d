"""Real pieces of the system for tests: key files, a directory, configs, and the store
running in-process on port 0 (its own thread and asyncio loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.config import (
    AgentConfig,
    StoreConfig,
    agent_config_from_dict,
    store_config_from_dict,
)
from agent.privacy import Protector, new_seal_keypair
from agent.store.server import StoreServer
from agent.testcall.sipp import free_port

DIRECTORY_TOML = """\
[[person]]
id = "e1001"
name = "Aino Virtanen"
role = "agent"
team = "parcels"
supervisor = "s2001"
aors = ["sip:1001@pbx.example", "1001"]

[[person]]
id = "e1002"
name = "Mikko Korhonen"
role = "agent"
team = "telesales"
supervisor = "s2001"
aors = ["sip:1002@pbx.example"]

[[person]]
id = "s2001"
name = "Sari Supervisor"
role = "supervisor"
team = "parcels"
aors = ["sip:2001@pbx.example"]
trained = 2026-01-15
"""

SERVICE_NUMBERS = ["0100 5577", "0100 5445", "+358 9 876 5432"]


@dataclass(frozen=True)
class Keys:
    directory: Path
    seal_private: Path  # the store's keyring (seal.pem)
    seal_public: Path  # what agents hold

    def protector(self, region: str = "FI") -> Protector:
        return Protector.load(region, self.seal_public)


@functools.cache
def _keypair() -> tuple[bytes, bytes]:
    return new_seal_keypair()


def make_keys(directory: Path) -> Keys:
    """Key files as `callrec keys init` writes them (one RSA key per test session)."""
    private, public = _keypair()
    directory.mkdir(parents=True, exist_ok=True)
    keys = Keys(directory, directory / "seal.pem", directory / "seal.pub.pem")
    keys.seal_private.write_bytes(private)
    keys.seal_public.write_bytes(public)
    os.chmod(keys.seal_private, 0o600)
    return keys


def agent_config(
    root: Path, keys: Keys, store_address: str, sip_port: int = 5070, **sections: dict[str, object]
) -> tuple[AgentConfig, dict[str, dict[str, object]]]:
    directory = root / "people.toml"
    if not directory.exists():
        directory.write_text(DIRECTORY_TOML)
    doc: dict[str, dict[str, object]] = {
        "agent": {"site": "hel-1", "data_dir": str(root / "agent-data")},
        "sip": {
            "listen": "127.0.0.1",
            "port": sip_port,
            "rtp_port_start": free_port(40),
            "rtp_port_count": 40,
            "rtp_timeout": "10s",
        },
        "privacy": {"seal_public_key_file": str(keys.seal_public)},
        "directory": {"file": str(directory)},
        "calls": {"service_numbers": SERVICE_NUMBERS},
        # Plain text on loopback must be asked for (mutual TLS is the default).
        "uplink": {"store_address": store_address, "rescan": "2s", "grace": "5s", "insecure": True},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return agent_config_from_dict(doc, root), doc


def _toml_item(value: object) -> str:
    """A list item: a string, or an inline table of strings (``[[sip.clients]]``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f'{k} = "{v}"' for k, v in value.items()) + "}"
    return f'"{value}"'


def write_toml(path: Path, doc: dict[str, dict[str, object]]) -> Path:
    lines: list[str] = []
    for section, values in doc.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(_toml_item(v) for v in value) + "]")
            else:
                lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def store_config(
    root: Path, listen: str = "127.0.0.1:0", tls: dict[str, object] | None = None
) -> StoreConfig:
    """``tls``: the ``[store.tls]`` table (default: plain text on loopback, asked for)."""
    store = {
        "listen": listen,
        "data_dir": str(root / "store-data"),
        "tls": tls or {"insecure": True},
    }
    return store_config_from_dict({"store": store}, root)


class InProcessStore:
    """The real StoreServer on its own event loop thread (plain text on loopback unless
    the config has ``[store.tls]`` files)."""

    def __init__(self, config: StoreConfig) -> None:
        if config.tls is None and not config.insecure:
            config = dataclasses.replace(config, insecure=True)
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server = StoreServer(config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> InProcessStore:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.startup(), self.loop).result(30)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace_s=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
