"""``callrec demo``: the whole register on its embedded defaults, in one command.

Creates a demo directory (keys, people, two configs), starts ``callrec store`` and
``callrec agent`` as real processes, places one real SIPREC call into the agent with
SIPp as the PBX (two streams of G.711 speech made by espeak-ng), waits for the
recording to arrive in the store, lists it, exports its audio and checks that the
customer's full number was written nowhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import grpc

from agent import certs
from agent.cli.keys import keys_init
from agent.cli.main import export_audio, format_recordings
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.testcall import SiprecCall, free_port, make_speech, run_sipp, siprec_scenario

CUSTOMER = "+358401234567"
SERVICE = "0100 5577"
PEOPLE = """\
# The directory of people: who may be tagged on a call and who may listen.
[[person]]
id = "e1001"
name = "Aino Virtanen"
role = "agent"
team = "parcels"
supervisor = "s2001"
aors = ["sip:1001@pbx.example", "1001"]
trained = 2026-01-15

[[person]]
id = "s2001"
name = "Sari Saarinen"
role = "supervisor"
team = "parcels"
aors = ["sip:2001@pbx.example"]
trained = 2026-01-15

[[person]]
id = "p3001"
name = "Pirjo Privacy"
role = "privacy_officer"
trained = 2026-01-15
"""
WEB_PEOPLE = ("e1001", "s2001", "p3001")


def _make_tls(directory: Path, site: str) -> None:
    """A small CA, the store's server certificate and the agent's client certificate
    (what `callrec certs ca|store|agent` make): agent and store talk mutual TLS."""
    if (directory / "ca.pem").exists():
        return
    ca = certs.new_ca()
    certs.write_pair(directory, "ca", ca)
    certs.write_pair(directory, "store", certs.issue_store(ca, ["127.0.0.1", "localhost"]))
    certs.write_pair(directory, "agent", certs.issue_agent(ca, site))


def _write_web_config(root: Path, store_cfg: Path, web_port: int, access_port: int) -> Path:
    """The web on loopback with the demo's local sign-in; the store trusts its tokens
    ([store.oidc]) and serves Access to it on access_listen (TLS, no client cert)."""
    with store_cfg.open("a") as fh:
        fh.write(
            f'\n[store.oidc]\nissuer = "https://127.0.0.1:{web_port}/local"\n'
            'audience = "callrec-web-local"\nca_file = "tls/ca.pem"\n'
        )
    web = root / "web.toml"
    web.write_text(
        f'[web]\nlisten = "127.0.0.1:{web_port}"\ntls_cert = "tls/store.pem"\n'
        f'tls_key = "tls/store.key"\nstore_address = "127.0.0.1:{access_port}"\n'
        'store_ca_file = "tls/ca.pem"\n\n'
        f"[web.local]\npeople = {list(WEB_PEOPLE)!r}\n".replace("'", '"')
    )
    return web


def _serve_web(root: Path, web_cfg: Path, web_port: int) -> None:
    """Start the web, print where it is, keep everything up until Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    web = _Daemon("web", ["web", "--config", str(web_cfg)], root)
    try:
        web.wait_for(r"Application startup complete", 60)
        sys.stdout.write(
            f"\ndemo: the people's web: https://127.0.0.1:{web_port}/ (the demo's own CA: "
            f"{root / 'tls' / 'ca.pem'}); sign in as {', '.join(WEB_PEOPLE)} "
            "(agent, supervisor, privacy officer). Ctrl-C stops everything.\n"
        )
        while web.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        web.stop()


def _write_configs(
    root: Path, store_port: int, sip_port: int, rtp_start: int, access_port: int
) -> tuple[Path, Path]:
    (root / "people.toml").write_text(PEOPLE)
    _make_tls(root / "tls", "demo")
    store = root / "store.toml"
    store.write_text(
        "[store]\n"
        f'listen = "127.0.0.1:{store_port}"\n'
        f'access_listen = "127.0.0.1:{access_port}"\n'
        'data_dir = "store-data"\n'
        'retention = "6 months"\n'
        'directory_file = "people.toml"\nseal_key_file = "keys/seal.pem"\n\n'
        '[store.keys]\nmaster_key_file = "keys/master.key"\n\n'
        '[store.tls]\nca_file = "tls/ca.pem"\ncert_file = "tls/store.pem"\n'
        'key_file = "tls/store.key"\n'
    )
    agent = root / "agent.toml"
    agent.write_text(
        '[agent]\nsite = "demo"\ndata_dir = "agent-data"\n\n'
        f'[sip]\nlisten = "127.0.0.1"\nport = {sip_port}\nrtp_port_start = {rtp_start}\n'
        "rtp_port_count = 40\n\n"
        f'[calls]\nservice_numbers = ["{SERVICE}", "0100 5445"]\n\n'
        '[directory]\nfile = "people.toml"\n\n'
        '[privacy]\nseal_public_key_file = "keys/seal.pub.pem"\n\n'
        f'[uplink]\nstore_address = "127.0.0.1:{store_port}"\n'
        'ca_file = "tls/ca.pem"\ncert_file = "tls/agent.pem"\nkey_file = "tls/agent.key"\n'
    )
    return store, agent


class _Daemon:
    """A callrec daemon whose output is shown with a prefix and remembered."""

    def __init__(self, name: str, args: list[str], cwd: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.write(f"{self.name:>5} | {line}")
            sys.stdout.flush()
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if found := regex.search(line):
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} did not log {pattern!r} (exit {self.process.poll()})"
                    )
                self._seen.wait(min(left, 0.5))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _wait_for_recording(store_dir: Path, timeout: float) -> pb.RecordingInfo:
    stub = pb_grpc.ConsoleStub(grpc.insecure_channel(f"unix:{store_dir / 'console.sock'}"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = stub.ListRecordings(pb.ListRecordingsRequest(limit=1), timeout=10).recordings
        if found:
            return found[0]
        time.sleep(0.5)
    raise RuntimeError(f"no recording reached the store within {timeout:.0f}s")


def _leaks(root: Path, exclude: Path) -> tuple[int, list[str]]:
    forms = [CUSTOMER, CUSTOMER[1:], "0401234567", "040 123 4567", urllib.parse.quote(CUSTOMER)]
    scanned, found = 0, []
    for path in root.rglob("*"):
        if exclude in path.parents or not path.is_file() or path.is_socket():
            continue
        data = path.read_bytes()
        scanned += 1
        found += [f"{form!r} in {path}" for form in forms if form.encode() in data]
    return scanned, found


def _find_by_number(
    root: Path, store_cfg: Path, access_port: int, info: pb.RecordingInfo
) -> tuple[bool, str]:
    """What a data-subject request does: a token for the privacy officer, then
    ``callrec dsr find`` with the number on stdin (never on the command line) and the
    time of the call; the store opens the sealed digits of the calls with the masked
    form in the window (audited) and answers with the call."""
    cli = [sys.executable, "-m", "agent.cli"]
    made = subprocess.run(
        [*cli, "access", "token", "create", "--config", str(store_cfg), "--person", "p3001"],
        cwd=root, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    token = made.stdout.strip().splitlines()[-1]
    at = info.manifest.started_at.ToDatetime().isoformat() + "Z"
    found = subprocess.run(
        [*cli, "dsr", "find", "--at", at, "--reason", "demo DSR-1",
         "--store", f"127.0.0.1:{access_port}", "--ca-file", "tls/ca.pem"],
        cwd=root, input="040 123 4567\n", capture_output=True, text=True, timeout=60,
        env={**os.environ, "CALLREC_TOKEN": token}, check=False,
    )  # fmt: skip
    if found.returncode != 0:
        raise RuntimeError(f"dsr find failed: {found.stderr.strip()}")
    hit = info.manifest.recording_id in found.stdout
    return hit, found.stdout.strip().splitlines()[-1] + (" (the call)" if hit else " (NOT it)")


def run_demo(directory: Path, seconds: float, web: bool = False) -> int:
    root = directory.resolve()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = sys.stdout.write
    out(f"demo: working in {root}\n")
    keys_init(root / "keys")
    store_port, sip_port, rtp_start, access_port = (
        free_port(),
        free_port(),
        free_port(40),
        free_port(),
    )
    store_cfg, agent_cfg = _write_configs(root, store_port, sip_port, rtp_start, access_port)
    web_port = free_port()
    web_cfg = _write_web_config(root, store_cfg, web_port, access_port) if web else None
    store = _Daemon("store", ["store", "--config", str(store_cfg)], root)
    agent: _Daemon | None = None
    try:
        store.wait_for(r"event=store_ready", 60)
        agent = _Daemon("agent", ["agent", "--config", str(agent_cfg)], root)
        agent.wait_for(r"event=agent_ready", 60)
        speech = make_speech(root / "speech")
        out(
            f"demo: SIPp (the PBX) calls the agent: customer {CUSTOMER} → service {SERVICE}, "
            f"answered by Aino Virtanen (1001), {seconds:.0f} s of speech on two streams\n"
        )
        call = SiprecCall(
            speech.customer,
            speech.employee,
            customer=f"sip:{CUSTOMER}@pbx.example",
            service="sip:01005577@pbx.example",
            call_ms=int(seconds * 1000),
        )
        result = run_sipp(siprec_scenario(call), ("127.0.0.1", sip_port), root / "pbx")
        if not result.ok:
            raise RuntimeError(f"SIPp failed: {result.errors or result.stdout[-500:]}")
        info = _wait_for_recording(root / "store-data", 60)
        agent.wait_for(rf"event=recording_uploaded recording_id={info.manifest.recording_id}", 30)
        out("\ndemo: the store holds:\n  " + "\n  ".join(format_recordings([info])) + "\n")
        audio = root / f"recording-{info.manifest.recording_id}.ogg"
        export_audio(root / "store-data", info.manifest.recording_id, audio, "demo", "verification")
        hit, said = _find_by_number(root, store_cfg, access_port, info)
        out(f"demo: the privacy officer's `callrec dsr find` (number on stdin, ±15 min): {said}\n")
        scanned, leaks = _leaks(root, exclude=root / "pbx")
        out(f"demo: stereo audio (customer left, employee right): {audio}\n")
        out(
            f"demo: full customer number searched in {scanned} files the system wrote: "
            + ("NOT FOUND (good)\n" if not leaks else "FOUND:\n  " + "\n  ".join(leaks) + "\n")
        )
        if web_cfg is not None and hit and not leaks:
            _serve_web(root, web_cfg, web_port)
        return 1 if leaks or not hit else 0
    finally:
        if agent is not None:
            agent.stop()
        store.stop()
        os.sync()
