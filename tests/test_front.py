"""The SIP front's files rendered from the agent's config, checked by Kamailio itself;
the front process run, probed, killed and restarted; and the ``[sip]`` keys that
shape the pool."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import metrics
from agent.config import AgentConfig, ConfigError
from agent.recorder.front.files import (
    FrontFiles,
    front_files,
    render_config,
    render_dispatcher_list,
    write_front_files,
)
from agent.recorder.front.kamailio import FrontProcess, destinations, kamcmd, parse_dispatcher_list
from agent.recorder.front.logfilter import sanitize
from agent.testcall.sipp import free_port
from tests.support.stack import Keys, agent_config

KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
needs_kamailio = pytest.mark.skipif(
    not os.access(KAMAILIO, os.X_OK), reason="kamailio not installed (Debian: kamailio)"
)


def config(root: Path, keys: Keys, **sip: object) -> AgentConfig:
    """An agent config with a front over 3 workers; ``sip`` overrides [sip] keys
    (``sip_port``: the front's port)."""
    sip_port = sip.pop("sip_port", 25060)
    assert isinstance(sip_port, int)
    settings: dict[str, object] = {
        "front": True,
        "workers": 3,
        "worker_port": 25071,
        "rtp_port_start": 30000,
        "rtp_port_count": 40,
        **sip,
    }
    cfg, _ = agent_config(root, keys, "127.0.0.1:1", sip_port=sip_port, sip=settings)
    return cfg


# ---------------------------------------------------------------- rendering


def test_dispatcher_list_has_one_destination_per_worker(tmp_path: Path, keys: Keys) -> None:
    lines = render_dispatcher_list(config(tmp_path, keys).sip).splitlines()
    assert lines[0].startswith("#")
    assert lines[1:] == [
        "1 sip:127.0.0.1:25071;transport=udp 0 3 duid=w0;maxload=4",
        "1 sip:127.0.0.1:25072;transport=udp 0 2 duid=w1;maxload=4",
        "1 sip:127.0.0.1:25073;transport=udp 0 1 duid=w2;maxload=4",
    ]


def test_config_is_rendered_from_the_agents_sip_section(tmp_path: Path, keys: Keys) -> None:
    cfg = config(tmp_path, keys, probe_interval="3s", max_call="1h")
    files = front_files(cfg)
    text = render_config(cfg, files)
    assert "%" not in text.replace("%d", "")  # every placeholder filled
    assert "listen=udp:127.0.0.1:25060" in text and "listen=tcp:127.0.0.1:25060" in text
    assert f'"list_file", "{files.dispatcher_list}"' in text
    assert '"ds_ping_interval", 3)' in text and '"ds_hash_expire", 3660)' in text
    assert 'ds_select_dst("1", "10")' in text
    # production: the ctl socket where callrec-front.service's ExecReload looks
    assert '"binrpc", "unix:/run/callrec-front/kamailio_ctl"' in text
    short = tmp_path.parent / "s"  # pytest's own tmp_path may already be too deep
    short.mkdir(exist_ok=True)
    run_by_agent = front_files(config(short, keys, run_front=True))
    assert run_by_agent.ctl == f"unix:{short}/agent-data/front/run/kamailio_ctl"
    (tmp_path / ("d" * 100)).mkdir()
    deep = front_files(config(tmp_path / ("d" * 100), keys, run_front=True))
    assert deep.ctl == "unix:kamailio_ctl"  # relative to its runtime_dir: Kamailio runs there


def test_front_files_are_replaced_whole_with_group_read(tmp_path: Path, keys: Keys) -> None:
    cfg = config(tmp_path, keys)
    first = write_front_files(cfg)
    directory_inode = first.directory.stat().st_ino
    config_inode = first.config.stat().st_ino
    second = write_front_files(cfg)
    assert stat.S_IMODE(second.directory.stat().st_mode) == 0o750
    for path in (second.config, second.dispatcher_list):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert second.directory.stat().st_ino == directory_inode  # bind-mounted: kept
    assert second.config.stat().st_ino != config_inode  # written beside, renamed over
    assert sorted(p.name for p in second.directory.iterdir()) == [
        "dispatcher.list",
        "kamailio.cfg",
    ]


@needs_kamailio
def test_kamailio_accepts_the_rendered_config(tmp_path: Path, keys: Keys) -> None:
    files = write_front_files(config(tmp_path, keys, run_front=True))
    check = subprocess.run(
        [KAMAILIO, "-c", "-f", str(files.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-2000:]


# ---------------------------------------------------------------- logs and kamcmd

DISPATCHER_LIST = """{
\tRECORDS: {
\t\tSET: {
\t\t\tTARGETS: {
\t\t\t\tDEST: {
\t\t\t\t\tURI: sip:127.0.0.1:5072;transport=udp
\t\t\t\t\tFLAGS: IP
\t\t\t\t\tATTRS: {
\t\t\t\t\t\tDUID: w1
\t\t\t\t\t}
\t\t\t\t\tRUNTIME: {
\t\t\t\t\t\tDLGLOAD: 0
\t\t\t\t\t}
\t\t\t\t}
\t\t\t\tDEST: {
\t\t\t\t\tURI: sip:127.0.0.1:5071;transport=udp
\t\t\t\t\tFLAGS: AP
\t\t\t\t\tATTRS: {
\t\t\t\t\t\tDUID: w0
\t\t\t\t\t}
\t\t\t\t\tRUNTIME: {
\t\t\t\t\t\tDLGLOAD: 3
\t\t\t\t\t}
\t\t\t\t}
"""


def test_dispatcher_list_from_kamcmd() -> None:
    found = parse_dispatcher_list(DISPATCHER_LIST)
    assert [(d.duid, d.active, d.load) for d in found] == [("w0", True, 3), ("w1", False, 0)]


@pytest.mark.parametrize(
    ("line", "leak"),
    [
        ("parse_msg(): message=<INVITE sip:+358401234567@pbx SIP/2.0", "358401234567"),
        ("From: <sips:aino.virtanen@pbx.example>", "aino.virtanen"),
        ("To: <tel:+358-40-123-4567>", "123-4567"),
        ("cannot find load for (0401234567@10.0.0.1)", "0401234567"),
    ],
)
def test_relayed_kamailio_lines_lose_user_parts_and_numbers(line: str, leak: str) -> None:
    assert leak not in sanitize(line)


def test_sanitiser_keeps_ipv4_addresses_but_not_numbers_beside_them() -> None:
    line = "source=192.168.100.200 worker=127.0.0.1:5071 cid=040.123.4567 x=358.40.123.45.67"
    assert sanitize(line) == (
        "source=192.168.100.200 worker=127.0.0.1:5071 cid=<redacted> x=<redacted>"
    )


def test_relay_counts_refusals_and_keeps_our_event_lines(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, keys, run_front=True)
    front = FrontProcess(cfg, front_files(cfg))
    caplog.set_level(logging.DEBUG, logger="agent.recorder.front.kamailio")
    refused_before = metrics.FRONT_REFUSED.labels("503")._value.get()
    front._relay_line(" 1(685) WARNING: <script>: event=front_refused call_ref=ab status=503")
    front._relay_line(" 2(686) WARNING: <script>: event=front_failover call_ref=cd worker=w0")
    front._relay_line(" 0(681) INFO: <core> [main.c:3055]: main(): processes (at least): 9")
    front._relay_line(" 3(687) ERROR: tm [t_reply.c:1]: message <sip:0401234567@x>")
    assert (front.refused, front.failovers) == (1, 1)
    front._relay_line(" 2(686) INFO: <script>: event=front_dispatched call_ref=a2543172c6b9699b")
    assert metrics.FRONT_REFUSED.labels("503")._value.get() == refused_before + 1
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert records[0] == (
        "WARNING",
        "event=front_refused call_ref=ab status=503 refused_total=1",
    )
    assert records[2][0] == "DEBUG"  # Kamailio's start-up chatter
    assert records[3][0] == "ERROR" and "0401234567" not in records[3][1]
    assert "call_ref=a2543172c6b9699b" in records[4][1]  # a digest is not a number


# ---------------------------------------------------------------- the process


@needs_kamailio
def test_front_runs_probes_and_is_restarted_when_it_dies(tmp_path: Path, keys: Keys) -> None:
    """No worker listens: the front starts, probes both and takes them out of rotation;
    killed, it is started again by ``supervise()``. The data dir is deep: the ctl
    socket's absolute path would pass the 104 bytes a unix socket name may have."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    cfg = config(
        deep,
        keys,
        sip_port=free_port(),
        run_front=True,
        workers=2,
        worker_port=free_port(2),
        probe_interval="1s",
    )
    front = FrontProcess(cfg, write_front_files(cfg))
    front.start()
    try:
        _wait(lambda: not any(d.active for d in destinations(front.files)), 5.0)
        first = front.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        _wait(lambda: _supervised(front) not in (None, first), 10.0)
        _wait(lambda: len(destinations(front.files)) == 2, 10.0)
        assert front.restarts == 1
    finally:
        front.stop()
    assert front.pid is None


def _supervised(front: FrontProcess) -> int | None:
    front.supervise()
    return front.pid


def _wait(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if callable(condition) and condition():
                return
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # kamcmd while Kamailio (re)starts
        time.sleep(0.1)
    pytest.fail(f"condition not met in {timeout}s")


# ---------------------------------------------------------------- [sip] keys


def test_sip_defaults_keep_a_single_worker_without_front(tmp_path: Path, keys: Keys) -> None:
    cfg, _ = agent_config(tmp_path, keys, "127.0.0.1:1", sip_port=5070)
    sip = cfg.sip
    assert (sip.front, sip.run_front, sip.workers, sip.drain_s) == (False, False, 1, 60.0)
    assert sip.worker_sip(0) == ("127.0.0.1", 5070)
    assert sip.worker_port == 5071 and sip.probe_interval_s == 2.0


def test_worker_addresses_behind_the_front(tmp_path: Path, keys: Keys) -> None:
    sip = config(tmp_path, keys, drain="90s").sip
    assert [sip.worker_sip(i) for i in range(3)] == [
        ("127.0.0.1", 25071),
        ("127.0.0.1", 25072),
        ("127.0.0.1", 25073),
    ]
    assert sip.worker_rtp(2) == (30080, 40)
    assert sip.drain_s == 90.0


@pytest.mark.parametrize(
    ("sip", "message"),
    [
        ({"worker_port": 25059}, "[sip] worker_port = 25059: expected ports that exclude port"),
        ({"worker_port": 65534}, "[sip] worker_port = 65534: expected room for 3 worker ports"),
        (
            {"rtp_port_start": 65000, "rtp_port_count": 200},
            "[sip] rtp_port_start = 65000: expected room for 3 RTP",
        ),
        ({"rtp_port_start": 25040}, "[sip] rtp_port_start = 25040: expected RTP ranges apart"),
        ({"rtp_port_count": 16}, "[sip] rtp_port_count = 16: expected an integer from 32"),
        ({"drain": "soon"}, '[sip] drain = "soon": expected a duration'),
        ({"front": "yes"}, '[sip] front = "yes"'),
        ({"worker_listen": "localhost"}, '[sip] worker_listen = "localhost": expected an IP'),
    ],
)
def test_bad_sip_keys_are_named(
    tmp_path: Path, keys: Keys, sip: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        config(tmp_path, keys, **sip)
    assert str(exc.value).startswith(message), str(exc.value)


# ---------------------------------------------------------------- what Kamailio logs

LEAKY_NUMBER = "358401234567"


def _leaky_requests(port: int) -> None:
    """What makes Kamailio 5.6 print message content: a caller-ID name with an
    unbalanced quote (UDP), and a TCP request without Content-Length (its whole
    buffer is dumped)."""
    invite = (
        f"INVITE sip:srs@127.0.0.1:{port} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-leak\r\n"
        f'From: "Asiakas +{LEAKY_NUMBER} <sip:+{LEAKY_NUMBER}@pbx.example>;tag=1\r\n'
        f"To: <sip:0{LEAKY_NUMBER[3:]}@127.0.0.1>\r\nCall-ID: leak-1\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{LEAKY_NUMBER}@127.0.0.1:5999>\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(invite.encode(), ("127.0.0.1", port))
    bad_tcp = invite.replace("Content-Length: 0\r\n", "").replace("UDP", "TCP")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as tcp:
        tcp.sendall(bad_tcp.encode())
        with contextlib.suppress(OSError):
            tcp.recv(1000)


def _front_command(cfg: AgentConfig, files: FrontFiles) -> list[str]:
    """callrec-front.service's ExecStart, with this test's paths."""
    unit = (Path(__file__).parent.parent / "systemd" / "callrec-front.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    command = line.removeprefix("ExecStart=").split()
    replace = {
        "/opt/callrec/venv/bin/callrec": str(Path(sys.executable).parent / "callrec"),
        "/usr/sbin/kamailio": KAMAILIO,
        "/run/callrec-front": str(files.runtime_dir),
        "/var/lib/callrec-agent/front/kamailio.cfg": str(files.config),
    }
    return [replace.get(arg, arg) for arg in command]


@needs_kamailio
def test_production_front_log_holds_no_number(tmp_path: Path, keys: Keys) -> None:
    cfg = config(tmp_path, keys, sip_port=free_port(), run_front=True, workers=1,
                 worker_port=free_port(), front_http_port=free_port())  # fmt: skip
    files = write_front_files(cfg)
    files.runtime_dir.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "journal.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(_front_command(cfg, files), stdout=sink, stderr=sink)
    try:
        _wait(lambda: bool(kamcmd(files, "core.uptime", timeout=2.0)), 15.0)
        _leaky_requests(cfg.sip.port)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    text = out.read_text()
    assert "bad request" in text or "parse" in text, text[-3000:]  # it did complain
    assert "event=front_exited exit_code=0 lines_dropped=" in text
    for leak in (LEAKY_NUMBER, LEAKY_NUMBER[3:]):
        assert leak not in text, text[-3000:]


@needs_kamailio
def test_front_run_by_the_agent_logs_no_number(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, keys, sip_port=free_port(), run_front=True, workers=1,
                 worker_port=free_port(), front_http_port=free_port())  # fmt: skip
    caplog.set_level(logging.DEBUG)
    front = FrontProcess(cfg, write_front_files(cfg))
    front.start()
    try:
        _leaky_requests(cfg.sip.port)
        time.sleep(1.0)
    finally:
        front.stop()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad request" in text or "parse" in text, text[-3000:]
    for leak in (LEAKY_NUMBER, LEAKY_NUMBER[3:]):
        assert leak not in text, text[-3000:]
