"""The recorder pool for real: the store, the agent with N pjsua2 workers behind the
Kamailio front it runs itself (``run_front = true``), one RTP sender for every call
(fed through a FIFO in the test process), and SIPp as the SRC; and what tests check on
what was stored (times, parties, decoded audio). ``tests.bench.concurrent`` uses the same
pieces to measure the pool's cost."""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from agent.capture import UNKNOWN
from agent.cli.main import main as callrec
from agent.config import load_agent_config
from agent.recorder.front.files import FrontFiles, front_files
from agent.recorder.front.kamailio import Destination, destinations
from agent.recorder.sip import call_ref
from agent.store.catalog import Catalog, RecordingRow
from agent.testcall.ports import forget_taken
from agent.testcall.rtp import FifoControl, RtpSender
from agent.testcall.rtpsend import CompiledSender
from agent.testcall.sipp import SippResult, SiprecCall, free_port, run_sipp, siprec_scenario
from tests.support.audio import Speech, make_speech
from tests.support.daemons import Daemon, start_agent, start_store
from tests.support.proxy import TcpProxy
from tests.support.stack import Keys, make_keys

FULL_NUMBER = "358401234567"
NATIONAL = "0401234567"
SERVICE_AOR = "sip:+35898765432@pbx.example"  # "+358 9 876 5432" in stack.SERVICE_NUMBERS


Sender = RtpSender | CompiledSender
SENDERS = ("c", "python")


@contextmanager
def rtp_sender(directory: Path, kind: str = "c") -> Iterator[tuple[Path, Sender]]:
    """One sender for every call (FACTS.md: one process per call starves the host),
    fed through a FIFO (SIPp's exec then costs a few ms per call, not a Python start):
    ``c`` the compiled one (agent/testcall/rtpsend.c, sendmmsg per 20 ms tick),
    ``python`` one thread of this process (tops out below 400 calls, issue 20)."""
    if kind == "c":
        compiled = CompiledSender(directory / "rtp.fifo")
        try:
            yield compiled.fifo, compiled
        finally:
            compiled.stop()
        return
    if kind != "python":
        raise ValueError(f"sender {kind!r}: expected one of {', '.join(SENDERS)}")
    sender = RtpSender().start()
    control = FifoControl(sender, directory / "rtp.fifo").start()
    try:
        yield control.path, sender
    finally:
        control.stop()
        sender.stop()
        sender.join(5)


@dataclass
class Pool:
    root: Path
    agent: Daemon
    keys: Keys
    store_address: str
    store_dir: Path
    sip_port: int
    workers: int
    files: FrontFiles
    speech: Speech
    rtp: Path  # the RTP sender's FIFO
    sender: Sender | None = None
    store_pid: int | None = None
    proxy: TcpProxy | None = None  # between the agent and the store (running_pool(proxy=True))

    @property
    def target(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sip_port)

    @property
    def catalog(self) -> Catalog:
        return Catalog(f"sqlite:///{self.store_dir / 'catalog.sqlite3'}")

    def call(self, **fields: object) -> SiprecCall:
        """A SIPREC call with this pool's speech and RTP sender."""
        fields.setdefault("service", SERVICE_AOR)
        base = SiprecCall(self.speech.customer, self.speech.employee, rtp_via=self.rtp)
        return replace(base, **fields)  # type: ignore[arg-type]

    def run(self, scenario: str, name: str, **kwargs: object) -> SippResult:
        workdir = self.root / "sipp" / f"{name}-{time.monotonic_ns()}"
        return run_sipp(scenario, self.target, workdir, **kwargs)  # type: ignore[arg-type]

    def place(self, call: SiprecCall, name: str, timeout_s: float = 40.0) -> SippResult:
        return self.run(siprec_scenario(call), name, timeout_s=timeout_s)

    # ------------------------------------------------------------ what was stored

    def stored(self, call_id: str | None, timeout: float = 30.0) -> RecordingRow:
        assert call_id is not None
        return self.stored_many([call_id], timeout)[call_id]

    def stored_many(
        self, call_ids: Sequence[str], timeout: float = 60.0
    ) -> dict[str, RecordingRow]:
        refs = {call_ref(c): c for c in call_ids}
        found: dict[str, RecordingRow] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for row in self.catalog.list(limit=5000):
                if row.call_ref in refs:
                    found[refs[row.call_ref]] = row
            if len(found) == len(refs):
                return found
            time.sleep(0.3)
        missing = sorted(set(call_ids) - set(found))
        raise AssertionError(f"{len(missing)} calls not stored: {missing[:5]}\n{self.tail()}")

    def stored_refs(self) -> set[str]:
        return {row.call_ref for row in self.catalog.list(limit=5000)}

    def export(self, row: RecordingRow, out: Path) -> Path:
        args = ["console-export", row.recording_id, "--store-dir", str(self.store_dir)]
        assert callrec([*args, "--out", str(out), "--reason", "test", "--purpose", "security"]) == 0
        return out

    # ------------------------------------------------------------ the front and workers

    def destinations(self) -> list[Destination]:
        return destinations(self.files)

    def wait_idle(self, timeout: float = 30.0) -> list[Destination]:
        """Every worker in rotation and no call counted on any (nothing leaked). A front
        being replaced refuses its control socket for a moment: asked again until the
        deadline."""
        deadline = time.monotonic() + timeout
        found: list[Destination] = []
        refused = ""
        while time.monotonic() < deadline:
            try:
                found = self.destinations()
            except RuntimeError as error:  # kamcmd: the new front's socket is not up yet
                refused = str(error)
                time.sleep(0.2)
                continue
            if len(found) == self.workers and all(d.active and d.load == 0 for d in found):
                return found
            time.sleep(0.2)
        raise AssertionError(f"pool not idle: {found} {refused}\n{self.tail()}")

    def worker_pids(self) -> dict[int, int]:
        """The latest pid of each worker index, from the agent's log."""
        pids: dict[int, int] = {}
        for index, pid in re.findall(r"event=worker_started index=(\d+) pid=(\d+)", self.text()):
            pids[int(index)] = int(pid)
        return pids

    def text(self) -> str:
        return self.agent.text()

    def tail(self) -> str:
        return self.text()[-4000:]


def start_pool(
    root: Path,
    keys: Keys,
    store_address: str,
    store_dir: Path,
    speech: Speech,
    rtp: Path,
    workers: int,
    ready_timeout: float = 60.0,
    agent_section: dict[str, object] | None = None,
    uplink: dict[str, object] | None = None,
    **sip: object,
) -> Pool:
    """The agent with ``workers`` workers behind its own Kamailio on a free port;
    ``agent_section``: more ``[agent]`` keys (e.g. ``metrics``)."""
    root.mkdir(parents=True, exist_ok=True)
    sip_port = free_port()
    settings: dict[str, object] = {
        "front": True,
        "run_front": True,
        "workers": workers,
        "worker_port": free_port(workers),
        "front_http_port": free_port(),
        "rtp_port_count": 40,
        "rtp_port_start": free_port(40 * workers),
        "probe_interval": "1s",
        "rtp_timeout": "3s",
        **sip,
    }
    agent = start_agent(
        root, keys, store_address, sip_port, ready_timeout=ready_timeout, sip=settings,
        agent=agent_section or {}, uplink=uplink or {},
    )  # fmt: skip
    cfg = load_agent_config(root / "agent.toml")
    return Pool(
        root, agent, keys, store_address, store_dir, sip_port, workers, front_files(cfg),
        speech, rtp,
    )  # fmt: skip


def stop_pool(pool: Pool) -> None:
    """Stop the agent; its Kamailio must go with it (an orphan would keep the port)."""
    pids = re.findall(r"event=front_started pid=(\d+)", pool.text())
    pool.agent.stop(timeout=60)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(int(pid)), f"kamailio {pid} left"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def employees(row: RecordingRow) -> list[tuple[str, str]]:
    return [(e["id"], e["name"]) for e in row.employees]


def flags(row: RecordingRow) -> set[str]:
    return set(row.flags.split(",")) - {""}


def assert_times(row: RecordingRow, answered: float | None, ended: float | None) -> None:
    """The row's times are SIPp's: the 200 OK arrived (±0.5 s), the BYE left (±1 s).

    The end is when the front received the BYE (it stamps it): it used to be when the
    worker read it, which with a dozen calls ending at once on a busy two-core CI host
    trailed SIPp's send by 511 ms, once. The bound stays: SIPp logs before it sends.
    """
    assert answered is not None and ended is not None
    assert abs(row.started_at_ms - answered * 1000) <= 500, (row.started_at_ms, answered)
    assert abs(row.ended_at_ms - ended * 1000) <= 1000, (row.ended_at_ms, ended)


def unknown_parties(row: RecordingRow) -> bool:
    return row.customer_kind == UNKNOWN and row.employee_id == UNKNOWN


@contextmanager
def running_pool(
    root: Path,
    workers: int,
    speech: Speech | None = None,
    ready_timeout: float = 60.0,
    agent_section: dict[str, object] | None = None,
    sender: str = "python",
    uplink: dict[str, object] | None = None,
    proxy: bool = False,
    store_section: dict[str, str] | None = None,
    **sip: object,
) -> Iterator[Pool]:
    """Store, RTP sender (``sender``: see :func:`rtp_sender`) and a pool of ``workers``,
    all stopped at the end; ``uplink``: more ``[uplink]`` keys; ``proxy``: the agent
    reaches the store through a :class:`TcpProxy` (which counts the bytes);
    ``store_section``: more ``[store]`` keys (e.g. ``live_timeout``)."""
    keys, speech = make_keys(root / "keys"), speech or make_speech(root / "speech")
    (root / "store").mkdir()
    store, address = start_store(root / "store", **(store_section or {}))
    relay = TcpProxy(int(address.rpartition(":")[2]), lifetime_s=3600) if proxy else None
    try:
        if relay is not None:
            relay.__enter__()
            address = f"127.0.0.1:{relay.port}"
        with rtp_sender(root, sender) as (rtp, rtp_out):
            store_dir = root / "store" / "store-data"
            pool = start_pool(
                root / "agent", keys, address, store_dir, speech, rtp, workers, ready_timeout,
                agent_section, uplink, **sip,
            )  # fmt: skip
            pool.sender = rtp_out
            pool.store_pid = store.process.pid if store.process else None
            pool.proxy = relay
            try:
                yield pool
            finally:
                stop_pool(pool)
                forget_taken()
    finally:
        if relay is not None:
            relay.stop()
        store.stop()


@contextmanager
def second_pool(pool: Pool, workers: int, **sip: object) -> Iterator[Pool]:
    """Another agent (own front, own port) storing into ``pool``'s store."""
    other = start_pool(
        pool.root / f"agent-{time.monotonic_ns()}", pool.keys, pool.store_address,
        pool.store_dir, pool.speech, pool.rtp, workers, 60.0, None, None, **sip,
    )  # fmt: skip
    try:
        other.wait_idle()
        yield other
    finally:
        stop_pool(other)


def place_all(pool: Pool, calls: dict[str, str], timeout_s: float = 40.0) -> dict[str, SippResult]:
    """Run each scenario in its own SIPp at once (over TCP if its name says so)."""
    with ThreadPoolExecutor(len(calls)) as executor:
        futures = {
            name: executor.submit(
                pool.run,
                scenario,
                name,
                timeout_s=timeout_s,
                extra_args=["-t", "t1"] if name.startswith("tcp") else [],
            )
            for name, scenario in calls.items()
        }
        return {name: future.result() for name, future in futures.items()}


def place_and_store(
    pool: Pool, scenarios: dict[str, str]
) -> tuple[dict[str, SippResult], dict[str, RecordingRow]]:
    """Place the calls at once; each must succeed and be stored with SIPp's times."""
    results = place_all(pool, scenarios)
    for name, result in results.items():
        assert result.ok, (name, result.errors[-1500:])
    rows = pool.stored_many([r.call_id or "" for r in results.values()])
    by_name = {name: rows[result.call_id or ""] for name, result in results.items()}
    for name, result in results.items():
        assert_times(by_name[name], result.answered_at, result.bye_at)
    return results, by_name


def window_rms(
    audio: tuple[int, Sequence[int]], channel: int, start_s: float, end_s: float
) -> float:
    """RMS of one channel of decoded audio between two offsets (seconds)."""
    channels, samples = audio
    mono = samples[channel::channels][int(start_s * 8000) : int(end_s * 8000)]
    return math.sqrt(sum(v * v for v in mono) / max(1, len(mono)))


def epoch(iso: str) -> float:
    """ISO-8601 (UTC, with or without offset) → epoch seconds."""
    return dt.datetime.fromisoformat(iso.rstrip("Z")).replace(tzinfo=dt.UTC).timestamp()


def wait_log(pool: Pool, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in pool.text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{pool.tail()}")
        time.sleep(0.1)
