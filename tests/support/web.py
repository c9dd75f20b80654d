"""The web's world: a real OpenID provider (npm oidc-provider on Node.js, HTTPS, dev
keys made here), the real store with the Access service trusting that provider, and
`callrec web` as its own process over HTTPS. Tests drive it with Chromium
(Playwright) or plain HTTPS requests."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.certs import issue_store, new_ca
from agent.config import store_config_from_dict
from agent.store.archive.vault import open_storage
from agent.store.catalog import now_ms
from tests.support.access_world import (
    CUSTOMER,
    LEAVER,
    PEOPLE,
    World,
    employees_json,
    store_doc,
)
from tests.support.services import free_tcp_port, make_row
from tests.support.stack import InProcessStore, make_keys

OIDC_DIR = Path(__file__).resolve().parent.parent / "oidc"
CLIENT_ID = "callrec-web"
ARTIFACTS = Path(os.environ.get("CALLREC_ARTIFACTS", "tests/artifacts/web"))


@dataclass(frozen=True)
class Signer:
    """The provider's dev signing key: tests mint tokens with it (expired, wrong
    audience) and forge others with a key of their own."""

    key: rsa.RSAPrivateKey
    kid: str
    issuer: str

    def token(self, sub: str, audience: str = CLIENT_ID, ttl_s: int = 600, **extra: Any) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": sub, "aud": audience, "iat": now - 5,
                  "exp": now + ttl_s, **extra}  # fmt: skip
        return jwt.encode(claims, self.key, "RS256", headers={"kid": self.kid})


@dataclass
class WebWorld:
    world: World
    url: str
    issuer: str
    signer: Signer
    ca_file: Path
    web_log: Path
    web_pid: int = 0
    restarter: Callable[[], int] | None = None
    state_dir: Path | None = None

    def restart(self) -> None:
        """Stop `callrec web` (SIGTERM, as systemd does) and start it again."""
        assert self.restarter is not None
        self.web_pid = self.restarter()

    def get(self, path: str, cookie: str = "", **headers: str) -> tuple[int, dict[str, str], bytes]:
        """One HTTPS request to the web (no redirects followed)."""
        return https_get(self.url + path, self.ca_file, cookie, **headers)


def https_get(
    url: str, ca_file: Path, cookie: str = "", timeout: float = 20, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS GET (no redirects followed): status, headers (lower-case), body."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_file))
    request = urllib.request.Request(url, headers={**headers, "cookie": cookie})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
    try:
        with opener.open(request, timeout=timeout) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


CHROMIUM = Path("/usr/bin/chromium")


def launch_chromium() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright, allowed to play audio unprompted."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        yield chromium
        chromium.close()


def node_ready() -> bool:
    return (
        shutil.which("node") is not None and (OIDC_DIR / "node_modules" / "oidc-provider").is_dir()
    )


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


def _tls(root: Path) -> tuple[Path, Path, Path]:
    ca = new_ca("callrec test CA")
    leaf = issue_store(ca)
    return (
        _write(root / "ca.pem", ca.cert_pem),
        _write(root / "server.pem", leaf.cert_pem),
        _write(root / "server.key", leaf.key_pem, 0o600),
    )


def start_provider(
    root: Path,
    tls: tuple[Path, Path, Path],
    web_port: int | tuple[int, ...],
    id_token_ttl_s: int = 3600,
) -> tuple[subprocess.Popen[bytes], str, Signer]:
    """``web_port``: the port of each web that signs people in with it."""
    ports = web_port if isinstance(web_port, tuple) else (web_port,)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = secrets.token_hex(4)
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True), "kid": kid, "alg": "RS256"}
    jwk.pop("key_ops", None)  # ["sign"] would be published, and verifiers refuse it
    jwk["use"] = "sig"
    secret = "test-secret-" + secrets.token_hex(8)
    conf = {
        "tls_cert": str(tls[1]), "tls_key": str(tls[2]), "jwks": {"keys": [jwk]},
        "client_id": CLIENT_ID, "client_secret": secret,
        "redirect_uris": [f"https://127.0.0.1:{port}/auth/callback" for port in ports],
        "ready_file": str(root / "provider.ready"), "id_token_ttl_s": id_token_ttl_s,
    }  # fmt: skip
    conf_path = _write(root / "provider.json", json.dumps(conf), 0o600)
    _write(root / "client-secret", secret, 0o600)
    ready = root / "provider.ready"
    with (root / "provider.log").open("wb") as log:
        proc = subprocess.Popen(
            ["node", str(OIDC_DIR / "provider.mjs"), str(conf_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=OIDC_DIR,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)  # the file is written in one call; let it land
    if not ready.exists():
        proc.kill()
        raise RuntimeError(f"oidc provider did not start: {(root / 'provider.log').read_text()}")
    line = ready.read_text()
    issuer = json.loads(line)["issuer"]
    return proc, issuer, Signer(key, kid, issuer)


def web_toml(
    root: Path,
    tls: tuple[Path, Path, Path],
    port: int,
    store: str,
    issuer: str,
    store_ca: Path | None = None,
    name: str = "web",
) -> Path:
    """``store_ca``: the CA of the store's Access TLS (None: plain text on loopback);
    ``name``: of the config file and the state directory (several webs in one root)."""
    ca_line = f'store_ca_file = "{store_ca}"' if store_ca else ""
    text = f"""
[web]
listen = "127.0.0.1:{port}"
tls_cert = "{tls[1]}"
tls_key = "{tls[2]}"
store_address = "{store}"
{ca_line}
session_idle = "10m"
page_size = 5
state_dir = "{root / f"{name}-state"}"

[web.oidc]
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
client_secret_file = "{root / "client-secret"}"
ca_file = "{tls[0]}"
scopes = "openid offline_access"
"""
    return _write(root / f"{name}.toml", text)


def _wait_https(url: str, ca: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"callrec web exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/", timeout=2, context=ctx):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"callrec web did not answer: {log.read_text()[-2000:]}")


def running_web(root: Path, id_token_ttl_s: int = 3600, leeway: str = "30s") -> Iterator[WebWorld]:
    """``id_token_ttl_s``: the provider's ID token lifetime; ``leeway``: the store's."""
    tls = _tls(root)
    web_port = free_tcp_port()
    provider, issuer, signer = start_provider(root, tls, web_port, id_token_ttl_s)
    keys = make_keys(root / "keys")
    (root / "people.toml").write_text(PEOPLE + LEAVER)
    doc = store_doc(root, keys)
    doc["store"]["oidc"] = {"issuer": issuer, "audience": CLIENT_ID, "ca_file": str(tls[0]),
                            "leeway": leeway}  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = [provider]
    try:
        with InProcessStore(store_config_from_dict(doc, root)) as store:
            storage = open_storage(store.config)
            world = World(root, keys, store.config, store, storage, doc)
            config = web_toml(root, tls, web_port, store.address, issuer)
            web_log = root / "web.log"
            url = f"https://127.0.0.1:{web_port}"

            def start() -> int:
                for old in procs[1:]:
                    stop_process(old)
                procs[1:] = [start_web(config, url, tls[0], web_log)]
                return procs[1].pid

            pid = start()
            try:
                yield WebWorld(world, url, issuer, signer, tls[0], web_log, pid, start,
                               root / "web-state")  # fmt: skip
            finally:
                storage.catalog.close()
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def start_web(config: Path, url: str, ca: Path, log: Path) -> subprocess.Popen[bytes]:
    """`callrec web --config config` as its own process, once it answers at ``url``."""
    callrec = Path(sys.executable).parent / "callrec"
    with log.open("ab") as out:
        web = subprocess.Popen(
            [str(callrec), "web", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_https(url, ca, web, log)
    except BaseException:
        stop_process(web)
        raise
    return web


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def seed_audio(
    world: World,
    people: list[tuple[str, str, str | None]],
    audio: bytes,
    started_ms: int,
    seconds: int = 30,
    **changes: Any,
) -> str:
    """A recording with the given audio through the vault and the catalog."""
    rid = secrets.token_hex(16)
    source = world.root / f"{rid}.src"
    source.write_bytes(audio)
    blob_key = world.storage.vault.store(rid, source, world.root)
    source.unlink()
    customer = world.keys.protector().protect(CUSTOMER)
    row = make_row(
        rid, blob_key, started_ms + seconds * 1000, started_at_ms=started_ms,
        employee_id=people[0][0],
        employee_name=people[0][1], employee_team=people[0][2],
        employees_json=changes.pop("employees_json", None) or employees_json(people),
        size=len(audio),
        sha256=hashlib.sha256(audio).hexdigest(), customer_masked=customer.masked,
        customer_digest=None, customer_digest_key_id=None,
        customer_tail_sealed=customer.tail_sealed, **changes,
    )  # fmt: skip
    assert world.storage.catalog.insert(row)
    return rid


@functools.cache
def long_opus(seconds: int) -> bytes:
    """A stereo Ogg/Opus tone of ``seconds`` (ffmpeg's lavfi: fast for an hour too)."""
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
         f"sine=frequency=440:sample_rate=8000:duration={seconds}", "-ac", "2",
         "-c:a", "libopus", "-b:a", "24k", "-f", "ogg", "-"],
        capture_output=True, check=True, timeout=600,
    )  # fmt: skip
    return done.stdout


@functools.cache
def left_only(seconds: int, quiet_from: int = 0, quiet_to: int = 0) -> bytes:
    """Stereo Ogg/Opus: a tone on the left (customer) channel, silence on the right
    (and on both from ``quiet_from`` to ``quiet_to`` seconds)."""
    tone = f"0.5*sin(440*2*PI*t)*not(between(t\\,{quiet_from}\\,{quiet_to}))"
    if quiet_to <= quiet_from:
        tone = "0.5*sin(440*2*PI*t)"
    done = subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i",
         f"aevalsrc={tone}|0:s=8000:d={seconds}:c=stereo",
         "-c:a", "libopus", "-b:a", "32k", "-f", "ogg", "-"],
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    return done.stdout


def day_ms(days_ago: float) -> int:
    return now_ms() - int(days_ago * 86_400_000)
