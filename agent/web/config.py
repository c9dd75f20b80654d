"""``[web]`` of the web's TOML file: where it listens (HTTPS), the store's Access
address, the OpenID provider and the session's idle timeout. One frozen value, read at
start; a bad key fails with its name and what was expected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.config.parsing import (
    LOG_LEVELS,
    ConfigError,
    _collecting,
    _listen,
    _load_toml,
    _optional_path,
    _optional_text,
    _Section,
    _sections,
    _subsection,
    is_loopback,
)


@dataclass(frozen=True)
class OidcClientConfig:
    issuer: str
    client_id: str
    client_secret_file: Path
    scopes: str = "openid"
    ca_file: Path | None = None  # to trust the provider's TLS certificate


@dataclass(frozen=True)
class WebConfig:
    listen: str
    tls_cert: Path
    tls_key: Path
    store_address: str
    oidc: OidcClientConfig | None  # None: the demo's local sign-in ([web.local])
    store_ca_file: Path | None = None  # None: plain text to a loopback store (tests)
    public_url: str | None = None  # e.g. "https://recordings.example.fi"; default: the Host
    session_idle_s: float = 1800.0
    state_dir: Path | None = None  # sessions kept here survive a restart; None: memory only
    time_zone: str = "Europe/Helsinki"
    page_size: int = 25
    log_level: str = "info"
    local_people: tuple[str, ...] = ()  # [web.local] people: the demo's sign-in list


def load_web_config(path: Path) -> WebConfig:
    return web_config_from_dict(_load_toml(path), path.resolve().parent)


@_collecting
def web_config_from_dict(doc: Mapping[str, Any], base: Path) -> WebConfig:
    s = _sections(doc, ("web", "log"), base)
    web = s["web"]
    oidc = _subsection(web, "oidc", base)
    local = _subsection(web, "local", base)
    cfg = WebConfig(
        listen=_listen(web, "listen", "127.0.0.1:8443"),
        tls_cert=web.path("tls_cert"),
        tls_key=web.path("tls_key"),
        store_address=web.text("store_address", "127.0.0.1:50052"),
        store_ca_file=_optional_path(web, "store_ca_file"),
        public_url=_optional_text(web, "public_url", "") or None,
        session_idle_s=web.seconds("session_idle", "30m"),
        state_dir=_optional_path(web, "state_dir"),
        time_zone=_zone(web),
        page_size=web.integer("page_size", 25, 5, 200),
        oidc=_oidc(oidc) if oidc.table or not local.table else None,
        local_people=local.strings("people", []) if local.table else (),
        log_level=s["log"].text("level", "info", choices=LOG_LEVELS),
    )
    if cfg.store_ca_file is None and not is_loopback(cfg.store_address):
        raise web._fail(
            "store_ca_file", None, "the CA of the store's Access port (plain text only on loopback)"
        )
    if cfg.local_people and (cfg.oidc is not None or not is_loopback(cfg.listen)):
        raise local._fail(
            "people", list(cfg.local_people), "no [web.oidc] and a loopback listen (demo only)"
        )
    for section in (*s.values(), oidc, local):
        section.check_unknown()
    return cfg


def _zone(web: _Section) -> str:
    name = web.text("time_zone", "Europe/Helsinki")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise web._fail("time_zone", name, 'an IANA time zone such as "Europe/Helsinki"') from None
    return name


def _oidc(oidc: _Section) -> OidcClientConfig:
    if not oidc.table:
        raise ConfigError("[web.oidc]: missing, the web signs people in with OpenID Connect")
    issuer = oidc.text("issuer")
    if not issuer.startswith("https://"):
        raise oidc._fail("issuer", issuer, "an https:// URL")
    return OidcClientConfig(
        issuer=issuer,
        client_id=oidc.text("client_id"),
        client_secret_file=oidc.path("client_secret_file"),
        scopes=oidc.text("scopes", "openid"),
        ca_file=_optional_path(oidc, "ca_file"),
    )
