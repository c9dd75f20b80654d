"""Every config key, documented once: the reference ``callrec config keys`` prints and
README's "Every config key" section holds (rendered from here, checked by a test).

The loaders in ``agent.config`` (and ``agent.web.config``, ``agent.client.profile``)
accept a key only when it is listed here: a key they read but this table lacks is
refused as unknown, and ``tests/test_config_reference.py`` loads a file of every key of
each kind, so a documented key the loaders no longer read fails too. A default is
written as in TOML; one in parentheses is prose (required, unset, or computed).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


@dataclass(frozen=True)
class Key:
    name: str
    default: str  # TOML ("30s", 5070, true), or prose in parentheses
    doc: str


Sections = Mapping[str, tuple[Key, ...]]
REQUIRED = "(required)"

LOG: tuple[Key, ...] = (
    Key("level", '"info"', "debug, info, warning or error; `systemctl reload` re-reads it"),
)
TLS_FILES: tuple[Key, ...] = (
    Key("ca_file", "(unset)", "the CA of our agents and store (PEM); with cert_file, key_file"),
    Key("cert_file", "(unset)", "this end's certificate (PEM); all three files or none"),
    Key("key_file", "(unset)", "this end's private key (PEM, 0600)"),
    Key("insecure", "false", "plain-text gRPC instead of mutual TLS: loopback addresses only"),
)

AGENT: Sections = {
    "agent": (
        Key("site", REQUIRED, 'names this agent in the store: a-z, 0-9 and "-" (e.g. "hel-1")'),
        Key("data_dir", REQUIRED, "captures/, outbox/, quarantine/, front/"),
        Key("metrics", "(unset: no /metrics)", 'Prometheus /metrics, e.g. "127.0.0.1:9464"'),
        Key("min_free", '"2 GiB"', 'free space below which new calls get 503; or a share "5%"'),
        Key(
            "quarantine_max_age", '"30d"', "quarantined recordings are deleted after this (1h…183d)"
        ),
    ),
    "sip": (
        Key("listen", '"127.0.0.1"', "the address the PBX/SBC sends SIPREC INVITEs to"),
        Key("port", "5070", "the public SIP port (the front's, or worker 0's without a front)"),
        Key(
            "rtp_port_start", "40000", "worker i binds RTP from rtp_port_start + i * rtp_port_count"
        ),
        Key("rtp_port_count", "200", "RTP ports per worker (32…20000)"),
        Key("workers", "1", "pjsua2 processes, 4 calls each; more than 1 needs front = true"),
        Key("rtp_timeout", '"30s"', "hang up a call whose RTP stopped without a BYE"),
        Key("max_call", '"4h"', "end a call that runs longer"),
        Key("drain", '"60s"', "at shutdown, calls in progress may run this long, then BYE"),
        Key(
            "worker_start",
            '"fork"',
            '"fork" from one pre-imported process, or "exec" (each its own)',
        ),
        Key(
            "media_thread",
            "true",
            "RTP read by pjmedia's thread; false: by the worker's (idle workers cost less)",
        ),
        Key("frame_ms", "40", "the bridge's frame: 20, 40 or 60 ms (fewer clock ticks per call)"),
        Key("customer_header", '"X-Callrec-Customer"', "plain INVITEs: the customer's number"),
        Key("employee_header", '"X-Callrec-Employee"', "plain INVITEs: the employee's SIP URI"),
        Key("service_header", '"X-Callrec-Service"', "plain INVITEs: the service number called"),
        Key("direction_header", '"X-Callrec-Direction"', "plain INVITEs: inbound or outbound"),
        Key("front", "false", "a Kamailio front on listen:port dispatches to the workers"),
        Key("run_front", "false", "the agent runs Kamailio itself (tests, development)"),
        Key("worker_listen", '"127.0.0.1"', "with front = true: where the workers listen"),
        Key("worker_port", "(port + 1)", "with front = true: worker i listens on worker_port + i"),
        Key("kamailio", '"/usr/sbin/kamailio"', "the Kamailio binary run_front starts"),
        Key("probe_interval", '"2s"', "the front's OPTIONS probe of each worker"),
        Key(
            "allowed_clients",
            '["127.0.0.0/8", "::1/128"]',
            "SRC addresses or networks that may record",
        ),
        Key("plain", "false", "accept plain (non-SIPREC) INVITEs with the X-Callrec-* headers"),
        Key("clients", "(none)", "[[sip.clients]] tables: one per recording client"),
        Key("front_http_port", "(port - 1)", "loopback HTTP where workers fetch INVITE metadata"),
        Key("max_message", "65536", "larger SIP requests are refused with 513 (4096…65536)"),
        Key("tls_port", "(unset: no SIP over TLS)", "SIP over TLS at the front (front = true)"),
        Key("tls_cert_file", "(required with tls_port)", "the front's TLS certificate (PEM)"),
        Key("tls_key_file", "(required with tls_port)", "its private key (PEM)"),
        Key(
            "tls_ca_file",
            "(required with tls_port)",
            "the CA of the recording clients' certificates",
        ),
    ),
    "sip.clients": (
        Key("address", REQUIRED, "the client's address or network"),
        Key("service_header", "(unset)", "a header whose URI gives the service line"),
        Key("service_number", "(unset)", "a fixed service line for every call of this client"),
        Key("employee_header", "(unset)", "a header whose URI names the employee"),
    ),
    "calls": (Key("service_numbers", REQUIRED, "the contact centre's own numbers"),),
    "directory": (Key("file", REQUIRED, "the people (people.toml): id, name, aors, role, team"),),
    "privacy": (
        Key("default_region", '"FI"', "how national numbers (040 123 4567) are read"),
        Key("seal_public_key_file", REQUIRED, "the store's public seal key (seal.pub.pem)"),
        Key("lookup_key_file", "(obsolete)", "no longer used: remove it and delete the file"),
    ),
    "audio": (
        Key("format", '"opus"', "opus, flac or wav"),
        Key("bitrate", '"24k"', 'the encoder\'s bitrate, e.g. "24k"'),
        Key("workers", "0", "finalize encoders at once; 0 = one per CPU core"),
    ),
    "uplink": (
        Key("store_address", '"127.0.0.1:50051"', "the store's agent port"),
        *TLS_FILES,
        Key("chunk_bytes", "262144", "upload chunk size (65536…262144)"),
        Key("concurrency", "2", "uploads at once (1…32)"),
        Key("rescan", '"30s"', "how often the outbox is looked at again"),
        Key("grace", '"10s"', "keep uploading this long at shutdown"),
        Key("backoff_max", '"30s"', "the longest wait between retries"),
        Key("outbox_warn_bytes", '"2 GiB"', "warn while the outbox holds more"),
        Key("outbox_warn_age", '"1h"', "warn while an outbox entry is older"),
        Key("outbox_check", '"30s"', "how often those two are checked"),
        Key("store_down_summary", '"5m"', "while the store is unreachable: a summary this often"),
        Key("live", "false", "SIPREC and plain calls stream to the store while they run"),
        Key("live_flush", '"1s"', "how far the store may lag behind the recorder (100ms…2s)"),
        Key(
            "live_encoding", '"alaw"', "live calls' legs on the wire: alaw (half the bytes) or pcm"
        ),
    ),
    "spool": (
        Key("dir", REQUIRED, "the PBX's recordings and sidecars (no [spool]: no pickup)"),
        Key("owned", "false", "delete the PBX's files once the recording is in the outbox"),
        Key("settle", '"2s"', "a file unwritten this long (and closed) is complete"),
        Key("orphan_timeout", '"10m"', "a sidecar without its audio (or audio without one)"),
        Key("rescan", '"30s"', "how often the spool is scanned"),
    ),
    "control": (
        Key("listen", '"127.0.0.1:8470"', "the recording control API; loopback unless TLS"),
        Key("tokens_file", "(unset)", '"<integration> <sha256 of the token>" per line'),
        Key("ca_file", "(unset)", "mutual TLS: the integrations' CA; with cert_file, key_file"),
        Key("cert_file", "(unset)", "the API's certificate (PEM)"),
        Key("key_file", "(unset)", "its private key (PEM)"),
    ),
    "log": LOG,
}

STORE: Sections = {
    "store": (
        Key("listen", '"127.0.0.1:50051"', "agents' port: mutual TLS, the site in the certificate"),
        Key("access_listen", "(unset: on listen)", "people's tools: TLS + a personal token"),
        Key("data_dir", REQUIRED, "catalog.sqlite3, blobs/, incoming/, console.sock"),
        Key("catalog", "(SQLite in data_dir)", 'or "postgresql+psycopg://user@host/db"'),
        Key("retention", '"6 months"', "recordings are destroyed this long after the call"),
        Key("sweep_interval", '"1h"', 'how often the store sweeps (sweep_by = "store")'),
        Key("sweep_batch", "1000", "recordings destroyed per transaction (1…10000)"),
        Key("sweep_by", '"store"', '"store" (its own loop) or "timer" (callrec-sweep.timer)'),
        Key("orphan_grace", '"24h"', "blobs without a catalog row are removed after this"),
        Key("region", '"fi"', "where this store keeps data; must be in allowed_regions"),
        Key("allowed_regions", "(EU/EEA)", 'regions personal data may be kept in ("fi", "eu-*")'),
        Key("blobs", '"files"', "files (in data_dir) or s3 (a [store.s3] table)"),
        Key(
            "shared_blobs_dir",
            "(data_dir/blobs)",
            "blobs = files on a shared catalog: a directory every store mounts",
        ),
        Key("s3", "(none)", "[store.s3]: object storage for the audio"),
        Key("keys", "(file)", "[store.keys]: the master key"),
        Key("tls", "(none)", "[store.tls]: ca_file, cert_file, key_file or insecure"),
        Key("oidc", "(none)", "[store.oidc]: accept the people's web's ID tokens"),
        Key("directory_file", "(unset: no Access)", "the people (people.toml)"),
        Key("seal_key_file", "(unset)", "seal.pem, 0600, outside data_dir: opens sealed digits"),
        Key("lookup_key_file", "(obsolete)", "no longer used: remove it and delete the file"),
        Key("metrics", "(unset: no /metrics)", 'Prometheus /metrics, e.g. "127.0.0.1:9465"'),
        Key("max_uploads_per_site", "16", "uploads one site may hold open at once"),
        Key("max_incoming_per_site", '"16 GiB"', "bytes of partial uploads one site may hold"),
        Key("upload_idle_timeout", '"60s"', "a stream silent this long is closed"),
        Key("part_max_age", '"6h"', "a partial upload begun longer ago is removed"),
        Key("live_timeout", '"60s"', "a live call silent this long is finished as incomplete"),
        Key("live_encoders", "2", "archive encoders (ffmpeg) at once on this store (1…64)"),
        Key(
            "live_tail_window",
            '"1h"',
            "a call finished as incomplete by live_timeout takes its returning agent's tail "
            "this long",
        ),
    ),
    "store.s3": (
        Key("bucket", REQUIRED, "the bucket"),
        Key("region", REQUIRED, "the bucket's region; must be in allowed_regions"),
        Key("endpoint", "(AWS, from region)", 'e.g. "https://s3.eu-north-1.amazonaws.com"'),
        Key("prefix", '"recordings/"', "object keys start with this"),
        Key("access_key_id", "(boto3's chain)", "with secret_access_key_file"),
        Key("secret_access_key_file", "(boto3's chain)", "a file holding the secret key"),
        Key("multipart_threshold_mb", "64", "uploads larger than this go in parts (5…5120)"),
        Key("multipart_chunk_mb", "16", "part size (5…5120)"),
        Key("region_attestation", '""', "where a non-AWS endpoint keeps the data (required then)"),
    ),
    "store.keys": (
        Key("wrapper", '"file"', "where the master key lives: file or pkcs11"),
        Key("master_key_file", '"keys/master.key"', "beside this config unless absolute; 0600"),
        Key("pkcs11_module", "(required for pkcs11)", "the PKCS#11 library"),
        Key("pkcs11_token_label", '"callrec"', "the token's label"),
        Key("pkcs11_pin_file", "(required for pkcs11)", "the user PIN, 0600, outside data_dir"),
    ),
    "store.tls": TLS_FILES,
    "store.oidc": (
        Key("issuer", REQUIRED, "the OpenID provider (https://)"),
        Key("audience", REQUIRED, "the web's client id (a string or a list)"),
        Key("person_claim", '"sub"', "the claim whose value is the directory's person id"),
        Key("jwks_uri", "(from discovery)", "the provider's keys"),
        Key("ca_file", "(system CAs)", "to trust the provider's TLS certificate"),
        Key("leeway", '"30s"', "clock skew allowed on token times"),
    ),
    "log": LOG,
}

WEB: Sections = {
    "web": (
        Key("listen", '"127.0.0.1:8443"', "HTTPS address and port"),
        Key("tls_cert", REQUIRED, "the web's certificate (PEM)"),
        Key("tls_key", REQUIRED, "its private key (PEM)"),
        Key("store_address", '"127.0.0.1:50052"', "the store's access_listen"),
        Key("store_ca_file", "(required off loopback)", "the CA of the store's Access port"),
        Key("public_url", "(the request's Host)", "the redirect URI is <public_url>/auth/callback"),
        Key("session_idle", '"30m"', "a session unused this long ends"),
        Key("state_dir", "(unset: in memory)", "sessions kept here (0700) survive a restart"),
        Key("time_zone", '"Europe/Helsinki"', "an IANA time zone for the pages' times"),
        Key("page_size", "25", "recordings per page (5…200)"),
        Key("oidc", "(required)", "[web.oidc]: the OpenID provider people sign in with"),
        Key("local", "(none)", "[web.local]: the demo's sign-in list instead of OIDC"),
    ),
    "web.oidc": (
        Key("issuer", REQUIRED, "the provider (https://)"),
        Key("client_id", REQUIRED, "the web's client id at the provider"),
        Key("client_secret_file", REQUIRED, "a file holding the client secret"),
        Key("scopes", '"openid"', "scopes asked for"),
        Key("ca_file", "(system CAs)", "only for a provider with a private CA"),
    ),
    "web.local": (
        Key("people", REQUIRED, "directory ids offered at sign-in (demo, loopback only)"),
    ),
    "log": LOG,
}

CLIENT: Sections = {
    "client": (
        Key("store", '"127.0.0.1:50051"', "the store's people's port (its access_listen)"),
        Key("ca_file", "(unset)", "the CA of that port: TLS (plain text only to loopback)"),
        Key("cert_file", "(unset)", "a client certificate, for a store without access_listen"),
        Key("key_file", "(unset)", "its private key"),
        Key("token_file", "(unset)", "a file holding your token; refused unless 0600"),
        Key("token_command", "(unset)", 'prints your token, e.g. "pass show callrec"'),
        Key("purpose", "(unset)", "the purpose when --purpose is not given"),
    ),
}

FILES: Mapping[str, tuple[str, Sections]] = {
    "agent": ("/etc/callrec/agent.toml", AGENT),
    "store": ("/etc/callrec/store.toml", STORE),
    "web": ("/etc/callrec/web.toml", WEB),
    "client": ("~/.config/callrec/client.toml", CLIENT),
}


def section_of(name: str) -> str:
    """The documented section of a table: ``sip.clients.3`` is ``sip.clients``."""
    return re.sub(r"(\.\d+)+$", "", name)


def documented(section: str) -> frozenset[str]:
    """The keys of ``[section]`` in any file (``[log]`` is in three)."""
    name = section_of(section)
    return frozenset(key.name for _, sections in FILES.values() for key in sections.get(name, ()))


# ---------------------------------------------------------------- rendering


def render_text(kind: str) -> str:
    """One file's keys as a commented TOML skeleton (``callrec config keys KIND``)."""
    path, sections = FILES[kind]
    lines = [f"# {path}: every key (defaults shown; in parentheses: not a TOML value)"]
    for name, keys in sections.items():
        table = f"[[{name}]]" if name == "sip.clients" else f"[{name}]"
        lines += ["", table]
        width = max(len(f"{k.name} = {k.default}") for k in keys)
        lines += [f"{f'{k.name} = {k.default}':<{width}}  # {k.doc}" for k in keys]
    return "\n".join(lines) + "\n"


def render_markdown(kind: str) -> str:
    """One file's keys as a Markdown table (README's "Every config key")."""
    path, sections = FILES[kind]
    out = [f"`{path}` (`callrec config keys {kind}`):", "", "| key | default | what |"]
    out.append("|---|---|---|")
    for name, keys in sections.items():
        for k in keys:
            default = k.default if k.default.startswith("(") else f"`{k.default}`"
            doc = k.doc.replace("|", "\\|")
            out.append(f"| `[{name}] {k.name}` | {default} | {doc} |")
    return "\n".join(out) + "\n"


def add_parsers(sub: SubParsers) -> None:
    config = sub.add_parser("config", help="the config files' keys")
    csub = config.add_subparsers(dest="config_command", required=True)
    keys = csub.add_parser("keys", help="every key of a config file: default and meaning")
    keys.add_argument("kind", nargs="?", choices=sorted(FILES), help="which file (default: all)")
    keys.add_argument("--markdown", action="store_true", help="as Markdown tables (README's)")


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "config":
        return None
    kinds = [args.kind] if args.kind else list(FILES)
    render = render_markdown if args.markdown else render_text
    sys.stdout.write("\n".join(render(kind) for kind in kinds))
    return 0
