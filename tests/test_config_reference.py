"""Every config key is documented once (agent/config/reference.py) and the documentation
cannot drift from the loaders: a file with every key of each kind loads, the keys the
loaders read are exactly the documented ones, the documented defaults are the loaders'
defaults, README holds the rendered reference, and a key read but undocumented is
refused as unknown."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.client.profile import profile_from_dict
from agent.config import (
    ConfigError,
    KeyRead,
    agent_config_from_dict,
    store_config_from_dict,
    toml_value,
    tracing_reads,
)
from agent.config import reference as config_reference
from agent.web.config import web_config_from_dict
from tests.support.daemons import REPO

CALLREC = str(Path(sys.executable).parent / "callrec")

AGENT_FULL = """
[agent]
site = "hel-1"
data_dir = "/var/lib/callrec-agent"
metrics = "127.0.0.1:9464"
min_free = "5%"
quarantine_max_age = "14d"

[sip]
listen = "192.0.2.10"
port = 5070
rtp_port_start = 40000
rtp_port_count = 200
workers = 2
rtp_timeout = "20s"
max_call = "2h"
drain = "30s"
worker_start = "exec"
media_thread = false
frame_ms = 60
customer_header = "X-Customer"
employee_header = "X-Employee"
service_header = "X-Service"
direction_header = "X-Direction"
front = true
run_front = false
worker_listen = "127.0.0.1"
worker_port = 5071
kamailio = "/usr/sbin/kamailio"
probe_interval = "1s"
allowed_clients = ["10.0.0.0/8"]
plain = true
front_http_port = 5069
max_message = 32768
tls_port = 5061
tls_cert_file = "tls/front.pem"
tls_key_file = "tls/front.key"
tls_ca_file = "tls/clients-ca.pem"

[[sip.clients]]
address = "10.1.2.0/24"
service_header = "P-Called-Party-ID"
employee_header = "X-Agent"

[[sip.clients]]
address = "10.1.3.7"
service_number = "+3581005577"

[calls]
service_numbers = ["0100 5577"]

[directory]
file = "people.toml"

[privacy]
default_region = "SE"
seal_public_key_file = "keys/seal.pub.pem"
lookup_key_file = "keys/lookup.key"

[audio]
format = "flac"
bitrate = "32k"
workers = 2

[uplink]
store_address = "store.example:50051"
ca_file = "tls/ca.pem"
cert_file = "tls/agent.pem"
key_file = "tls/agent.key"
chunk_bytes = 131072
concurrency = 4
rescan = "10s"
grace = "5s"
backoff_max = "1m"
outbox_warn_bytes = "1 GiB"
outbox_warn_age = "2h"
outbox_check = "10s"
store_down_summary = "10m"
live = true
live_flush = "500ms"
live_encoding = "pcm"

[log]
level = "debug"

[control]
listen = "192.0.2.10:8470"
tokens_file = "control.tokens"
ca_file = "tls/control-ca.pem"
cert_file = "tls/control.pem"
key_file = "tls/control.key"

[spool]
dir = "/var/spool/asterisk/monitor"
owned = true
settle = "3s"
orphan_timeout = "20m"
rescan = "1m"
"""

AGENT_PLAIN = """
[agent]
site = "hel-1"
data_dir = "/var/lib/callrec-agent"
[calls]
service_numbers = ["0100 5577"]
[directory]
file = "people.toml"
[privacy]
seal_public_key_file = "keys/seal.pub.pem"
[uplink]
insecure = true
"""

STORE_FULL = """
[store]
listen = "0.0.0.0:50051"
access_listen = "0.0.0.0:50052"
data_dir = "/var/lib/callrec-store"
catalog = "postgresql+psycopg://callrec@/callrec"
retention = "7 months"
sweep_interval = "30m"
sweep_batch = 500
sweep_by = "timer"
orphan_grace = "12h"
region = "fi"
allowed_regions = ["fi", "eu-north-1"]
blobs = "s3"
directory_file = "/etc/callrec/people.toml"
seal_key_file = "/etc/callrec/keys/seal.pem"
lookup_key_file = "/etc/callrec/keys/lookup.key"
metrics = "127.0.0.1:9465"
max_uploads_per_site = 8
max_incoming_per_site = "4 GiB"
upload_idle_timeout = "30s"
part_max_age = "3h"
live_timeout = "2m"
live_encoders = 4
live_tail_window = "30m"

[store.s3]
bucket = "recordings"
region = "eu-north-1"
endpoint = "http://127.0.0.1:8333"
prefix = "calls/"
access_key_id = "callrec"
secret_access_key_file = "/etc/callrec/s3-secret"
multipart_threshold_mb = 32
multipart_chunk_mb = 8
region_attestation = "SeaweedFS in our Helsinki DC"

[store.keys]
wrapper = "pkcs11"
master_key_file = "/etc/callrec/keys/master.key"
pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"
pkcs11_token_label = "register"
pkcs11_pin_file = "/etc/callrec/keys/pin"

[store.tls]
ca_file = "/etc/callrec/tls/ca.pem"
cert_file = "/etc/callrec/tls/store.pem"
key_file = "/etc/callrec/tls/store.key"

[store.oidc]
issuer = "https://login.example.fi"
audience = ["callrec-web"]
person_claim = "employeeid"
jwks_uri = "https://login.example.fi/keys"
ca_file = "/etc/callrec/idp-ca.pem"
leeway = "10s"

[log]
level = "warning"
"""

STORE_SHARED_FILES = """
[store]
data_dir = "/var/lib/callrec-store"
catalog = "postgresql+psycopg://callrec@/callrec"
blobs = "files"
shared_blobs_dir = "/srv/callrec-blobs"
[store.tls]
insecure = true
"""

STORE_PLAIN = """
[store]
data_dir = "/var/lib/callrec-store"
[store.tls]
insecure = true
"""

WEB_OIDC = """
[web]
listen = "0.0.0.0:8443"
tls_cert = "web.pem"
tls_key = "web.key"
store_address = "store.example:50052"
store_ca_file = "ca.pem"
public_url = "https://recordings.example.fi"
session_idle = "15m"
state_dir = "/var/lib/callrec-web"
time_zone = "Europe/Stockholm"
page_size = 50

[web.oidc]
issuer = "https://login.example.fi"
client_id = "callrec-web"
client_secret_file = "web-oidc-secret"
scopes = "openid profile"
ca_file = "idp-ca.pem"

[log]
level = "error"
"""

WEB_LOCAL = """
[web]
tls_cert = "web.pem"
tls_key = "web.key"
[web.local]
people = ["a1", "s1"]
"""

CLIENT_FILE = """
[client]
store = "store.example:50052"
ca_file = "ca.pem"
cert_file = "me.pem"
key_file = "me.key"
token_file = "token"
purpose = "verification"
"""

CLIENT_COMMAND = """
[client]
token_command = "pass show callrec/token"
"""

Loader = Callable[[dict[str, Any], Path], object]
FULL: dict[str, tuple[Loader, tuple[str, ...]]] = {
    "agent": (agent_config_from_dict, (AGENT_FULL, AGENT_PLAIN)),
    "store": (store_config_from_dict, (STORE_FULL, STORE_PLAIN, STORE_SHARED_FILES)),
    "web": (web_config_from_dict, (WEB_OIDC, WEB_LOCAL)),
    "client": (
        lambda doc, base: profile_from_dict(doc, base / "client.toml"),
        (CLIENT_FILE, CLIENT_COMMAND),
    ),
}


def _reads(kind: str) -> list[KeyRead]:
    load, docs = FULL[kind]
    with tracing_reads() as reads:
        for doc in docs:
            load(tomllib.loads(doc), Path("/etc/callrec"))
    return reads


@pytest.mark.parametrize("kind", sorted(FULL))
def test_the_keys_read_are_exactly_the_documented_ones(kind: str) -> None:
    sections = config_reference.FILES[kind][1]
    documented = {(s, k.name) for s, keys in sections.items() for k in keys}
    read = {(r.section, r.key) for r in _reads(kind)}
    assert sorted(read - documented) == [], "read by the loader, not in the reference"
    assert sorted(documented - read) == [], "in the reference, not read by the loader"


@pytest.mark.parametrize("kind", sorted(FULL))
def test_documented_defaults_are_the_loaders(kind: str) -> None:
    """A TOML default in the reference is the one the loader passes; a key the loader
    requires is documented in words (parentheses), never with a value."""
    sections = config_reference.FILES[kind][1]
    doc = {(s, k.name): k.default for s, keys in sections.items() for k in keys}
    wrong = []
    for read in _reads(kind):
        written = doc[read.section, read.key]
        prose = written.startswith("(")
        if not (prose if read.required else prose or written == toml_value(read.default)):
            wrong.append(f"[{read.section}] {read.key} = {written}, read with {read.default}")
    assert wrong == []


def test_a_key_read_but_undocumented_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = config_reference.documented

    def without_sweep_batch(section: str) -> frozenset[str]:
        return real(section) - {"sweep_batch"}

    monkeypatch.setattr(config_reference, "documented", without_sweep_batch)
    doc = tomllib.loads(STORE_PLAIN)
    store_config_from_dict(doc, Path("/etc/callrec"))  # not given: loads
    doc["store"]["sweep_batch"] = 10
    with pytest.raises(ConfigError) as refused:
        store_config_from_dict(doc, Path("/etc/callrec"))
    assert str(refused.value) == (
        "[store] sweep_batch: unknown key (read but undocumented: add it to "
        "agent/config/reference.py)"
    )


def test_readme_holds_the_rendered_reference() -> None:
    """Regenerate with `callrec config keys --markdown` between the markers."""
    readme = (REPO / "README.md").read_text()
    found = re.search(
        r"<!-- config-keys:begin -->\n(.*)<!-- config-keys:end -->", readme, re.DOTALL
    )
    assert found is not None
    rendered = subprocess.run(
        [CALLREC, "config", "keys", "--markdown"], check=True, capture_output=True, text=True
    ).stdout
    assert found.group(1) == rendered


def test_config_keys_prints_a_skeleton_that_names_each_key() -> None:
    shown = subprocess.run(
        [CALLREC, "config", "keys", "store"], check=True, capture_output=True, text=True
    ).stdout
    assert shown.startswith("# /etc/callrec/store.toml")
    assert '\nretention = "6 months"' in shown and "\n[store.s3]\n" in shown
    lines = [ln for ln in shown.splitlines() if ln and not ln.startswith(("#", "["))]
    assert len(lines) == sum(len(keys) for keys in config_reference.STORE.values())
    refused = subprocess.run(
        [CALLREC, "config", "keys", "stor"], check=False, capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "(choose from 'agent', 'client', 'store', 'web')" in refused.stderr


def _keys(table: dict[str, Any], section: str) -> Iterator[tuple[str, str]]:
    """(section, key) of a TOML table, its sub-tables and arrays of tables."""
    for key, value in table.items():
        yield section, key
        if isinstance(value, dict):
            yield from _keys(value, f"{section}.{key}")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                yield from _keys(item, f"{section}.{key}")


def test_every_key_in_readmes_toml_examples_is_documented() -> None:
    """README's ```toml blocks (whole files or fragments) use only real keys."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 8
    unknown = [
        f"[{section}] {key}"
        for block in blocks
        for name, table in tomllib.loads(block).items()
        for section, key in _keys(table, name)
        if key not in config_reference.documented(section)
    ]
    assert unknown == []
