"""Benchmark: concurrent SIPREC calls through the SIP front into the agent, and the
time from hang-up to the store's durable receipt.

    .venv/bin/python -m tests.bench.concurrent                      # 100 → 800, forked
    .venv/bin/python -m tests.bench.concurrent --steps 100,200,400 --start exec,fork

For each step N (and each way of starting workers, ``--start``: ``exec`` the old way,
each worker its own Python; ``fork`` from the zygote, the default; both: side by side),
a fresh store and agent with ceil(N/4) workers plus 10 % spare behind
the agent's own Kamailio; SIPp (one process, ``--rate`` calls/s) places N two-stream
SIPREC calls with real speech as G.711 A-law, all RTP from one sender fed through a
FIFO (FACTS.md): ``--sender c`` (default) the compiled one, ``agent/testcall/rtpsend.c``
(one ``sendmmsg`` per 20 ms tick), ``--sender python`` the one Python thread that fell
behind at 400 calls (issue 20). Measured per step:

- calls recorded / offered (stored in the catalog, whole: no flag, right length);
- RTP packets received / sent per stream: received from pjsua's stream counters at
  the end of each stream (the worker's ``call_recorded`` line), sent = the call's
  length * 50 packets/s (the sender plays a file longer than the call);
- the sender's own cost and lateness: its CPU (% of one core, /proc) while every call
  is up, and how far behind the 20 ms schedule its ticks ran (p50/p99/max), so a late
  sender (which sends less within the call) is never read as a recorder loss;
- packets lost: the sequence gaps pjsua counted (sent, never received); a sender
  that falls behind sends late, not with gaps, so this separates the recorder's
  losses from the load generator's;
- CPU (% of one core) and PSS of all workers, the front (Kamailio, every process),
  the agent's main process, idle and with every call up (the host's busy share from
  /proc/stat is in the JSON only: it is tick-sampled and reads low at light load);
- the cost of one call as a ratio to one idle worker (CPU and PSS, same run);
- hang-up → safe: SIPp's BYE to the store's ``stored_at`` (the receipt is sent after
  it), p50/p99/max.

- agent / store CPU seconds per call-minute over the whole step (calls placed →
  every call stored), encoder processes included: what a call costs each side in all;
- ``--path live`` (issue 19): the agent streams each call to the store while it runs
  (``[uplink] live = true``) and the store encodes the archive; ``--path file`` (the
  default) encodes on the agent and uploads at hang-up. For both: the agent's CPU and
  PSS per concurrent call (workers + main process), the store's CPU per call, the
  bytes on the wire per call-minute (counted by a loopback proxy between agent and
  store), and hang-up → safe taken at the agent's receipt (``recording_uploaded``:
  from then on the agent may delete its copy), beside hang-up → archived (the store's
  ``stored_at``; for the live path that is after the store's encoder).

Every call lasts ``--seconds`` plus the ramp (N / rate), so all N are up at once for
``--seconds`` at every step. A step "holds" when every offered call was stored whole
(no flag, length within 0.5 s of SIPp's answer → BYE) and within 0.2 s, RTP received /
sent ≥ 0.999 over
all streams, pjsua saw no sequence gap, and hang-up → safe p99 ≤ ``--safe-target``;
stepping stops at the first step that does not (``--keep-going``: runs them all).
The summary gives the largest step that held, calls per core and per GB of the
recorder (workers, zygote, Kamailio, agent), and CPU per concurrent call beside
rtpengine's (0.12 % of a core, userspace recording behind Kamailio, same machine) and
the floor (one pjsua process without the 4-call limit: 500 calls at 26 % of a core).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import resource
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.recorder.sip import call_ref
from agent.store.catalog import RecordingRow
from agent.testcall.sipp import SippResult, siprec_scenario
from tests.bench.common import TICK, Usage, children, emit, measure, percentile
from tests.support.audio import long_speech
from tests.support.pool import SENDERS, Pool, flags, running_pool

MODULE = "tests.bench.concurrent"
PACKETS_PER_S = 50
HOLDS_RX = 0.999  # received / sent over all streams
HOLDS_LENGTH_S = 0.2  # a recording's length against SIPp's answer → BYE, to hold
WHOLE_LENGTH_S = 0.5  # … to count as stored whole
RTPENGINE_CALL_PCT = 0.12  # % of a core per concurrent recorded call (issue 20)
FLOOR_CALL_PCT = 26.0 / 500  # one pjsua process without the 4-call limit (issue 20)
RECORDER = ("workers", "zygote", "front", "agent main")
# 4 calls x 2 streams x RTP+RTCP = 16, and pjsua takes more while answering: 32 leaves
# a margin and lets 800 calls' ranges (7,040 ports) fit among other tests' ports.
RTP_PORTS_PER_WORKER = 32
_EVENT = re.compile(
    r"^(\S+)Z \S+ event=(call_recorded|recording_finalized|recording_uploaded) "
    r"recording_id=(\S+)",
    re.M,
)
EVENTS = ("call_recorded", "recording_finalized", "recording_uploaded")
PHASES = ("BYE → captured", "captured → finalized", "finalized → receipt")
_BYE_LATE = re.compile(r"event=bye_read_late recording_id=\S+ late_s=([\d.]+)")
_RECORDED = re.compile(
    r"event=call_recorded .*?call_ref=(\S+) duration_s=([\d.]+) .*?rtp_received_lost=(\S+)"
)


@dataclass
class Step:
    calls: int
    workers: int
    start: str = "fork"  # how workers start: exec (each its own Python) or fork
    safe_target_s: float = 120.0
    answered: int = 0
    refused: int = 0
    stored: int = 0
    whole: int = 0
    rx_ratio_total: float = math.nan
    rx_ratio_worst: float = math.nan
    lost: int = 0  # sequence gaps pjsua saw: packets sent but not received
    received: int = 0
    streams: int = 0
    sender: str = "c"
    sender_late_s: float = 0.0  # max
    sender_late_p50_s: float = 0.0
    sender_late_p99_s: float = 0.0
    sender_packets: int = 0
    idle: dict[str, Usage] = field(default_factory=dict)
    busy: dict[str, Usage] = field(default_factory=dict)
    safe_s: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    drain_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    load: float = 0.0  # the host's 1-minute load average while every call was up
    not_started: str = ""  # why the agent did not start (its workers not ready in time)
    off: int = 0  # recordings more than HOLDS_LENGTH_S off SIPp's answer → BYE
    path: str = "file"
    archived_s: list[float] = field(default_factory=list)  # BYE → the store's stored_at
    wire_bytes: int = 0  # agent → store, through the proxy
    seconds: int = 0
    # CPU seconds over the whole step (calls placed → every call stored), children
    # (the encoders) included: "agent" = main process + workers, "store".
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Of the recordings not whole: how many hold less audio than SIPp's answer → BYE
    # (by more than WHOLE_LENGTH_S: audio lost), the others' times are off (a worker
    # that read the BYE late records silence up to it: nothing lost).
    audio_short: int = 0
    # What the calls lasted (answer → BYE, summed): every call lasts --seconds plus the
    # ramp, so --seconds x calls understated it (by half at 400 calls placed at 20/s).
    call_minutes: float = 0.0
    # Where a recording's length is off (issue 20): its start against SIPp's receipt of
    # the 200 (the worker stamps it when the 200 went out), its end against SIPp's BYE
    # (the front's receipt of it), its audio (as encoded) against answer → BYE.
    start_off_s: list[float] = field(default_factory=list)
    end_off_s: list[float] = field(default_factory=list)
    audio_off: int = 0  # recordings whose audio is more than HOLDS_LENGTH_S off
    # BYEs a worker read >= 0.2 s after the front received them (its log): the
    # recording ends at the front's stamp all the same.
    bye_late_s: list[float] = field(default_factory=list)

    def verdict(self) -> list[str]:
        """Why the step does not hold (empty: it holds)."""
        if self.not_started:
            return [f"agent did not start: {self.not_started}"]
        why = [] if self.whole == self.calls else [f"{self.calls - self.whole} not whole"]
        if not self.rx_ratio_total >= HOLDS_RX:
            why.append(f"rx/sent {self.rx_ratio_total:.4f}")
        if self.off:
            why.append(f"{self.off} more than {HOLDS_LENGTH_S} s off")
        if self.lost:
            why.append(f"{self.lost} packets in gaps")
        if not percentile(self.safe_s, 99) <= self.safe_target_s:
            why.append(f"safe p99 {percentile(self.safe_s, 99):.0f} s")
        return why

    @property
    def holds(self) -> bool:
        return not self.verdict()

    def recorder(self, phase: str) -> tuple[float, float]:
        """CPU (% of one core) and PSS (MB) of the recorder's processes."""
        usage = self.busy if phase == "busy" else self.idle
        parts = [usage[g] for g in RECORDER if g in usage]
        return sum(u.cpu_pct for u in parts), sum(u.pss_mb for u in parts)


def groups(pool: Pool) -> dict[str, list[int]]:
    front = int(re.findall(r"event=front_started pid=(\d+)", pool.text())[-1])
    zygote = re.findall(r"event=zygote_started pid=(\d+)", pool.text())
    return {
        "workers": list(pool.worker_pids().values()),
        "zygote": [int(zygote[-1])] if zygote else [],
        "front": children(front),
        "agent main": [pool.agent.process.pid] if pool.agent.process else [],
        "sender": pool.sender.thread_ids() if pool.sender else [],
        "store": [pool.store_pid] if pool.store_pid else [],
    }


def wait_stored(pool: Pool, call_ids: list[str], timeout: float) -> dict[str, RecordingRow]:
    """The rows of the calls that reached the store within ``timeout``."""
    refs = {call_ref(c): c for c in call_ids}
    found: dict[str, RecordingRow] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < len(refs):
        for row in pool.catalog.list(limit=len(refs) + 100):
            if row.call_ref in refs:
                found[refs[row.call_ref]] = row
        time.sleep(0.5)
    return found


def rtp_figures(step: Step, text: str, refs: set[str]) -> None:
    """Received / sent per stream, from the workers' ``call_recorded`` lines."""
    received = sent = 0
    worst = math.inf
    for ref, duration, rtp in _RECORDED.findall(text):
        if ref not in refs or rtp == "-":
            continue
        expected = max(1, round(float(duration) * PACKETS_PER_S))
        for stream in rtp.split(","):
            got_text, lost_text = stream.split(":", 1)[1].split("/", 1)
            got = int(got_text)
            step.lost += int(lost_text)
            received, sent = received + got, sent + expected
            worst = min(worst, got / expected)
            step.streams += 1
    step.received = received
    step.rx_ratio_total = received / sent if sent else math.nan
    step.rx_ratio_worst = worst if sent else math.nan


def phase_times(step: Step, text: str, byes: dict[str, float]) -> None:
    """Where the hang-up → safe time goes, per recording (``byes``: recording id →
    SIPp's BYE), from the agent's log: the worker moved the capture to ready, finalize
    wrote the outbox entry, the uplink got the store's receipt."""
    stamps: dict[str, dict[str, float]] = {}
    for stamp, event, recording_id in _EVENT.findall(text):
        when = dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC).timestamp()
        stamps.setdefault(recording_id, {})[event] = when
    step.phases = {name: [] for name in PHASES}
    for recording_id, bye in byes.items():
        seen = stamps.get(recording_id, {})
        points = [bye, *(seen.get(e) for e in EVENTS)]
        for name, start, end in zip(PHASES, points, points[1:], strict=False):
            if start is not None and end is not None:
                step.phases[name].append(end - start)


def place(pool: Pool, step: Step, seconds: int, rate: float, spread: int) -> SippResult:
    """Start the calls; measure idle before and busy while every call is up."""
    step.idle = measure(groups(pool), 5.0)
    ramp = step.calls / rate
    call = pool.call(
        call_ms=round((seconds + ramp) * 1000), call_ms_spread=spread * 1000, rtp_bind=False,
        accept_refusal=True,
    )  # fmt: skip
    seconds += math.ceil(ramp)
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(
            pool.run, siprec_scenario(call), f"step{step.calls}", calls=step.calls,
            rate=rate, timeout_s=seconds + spread + ramp + 60,
        )  # fmt: skip
        time.sleep(ramp + 2.0)
        window = max(5.0, seconds - ramp - 5.0)
        step.busy = measure(groups(pool), window)
        step.load = os.getloadavg()[0]
        return future.result()


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of ``pids`` and of their waited-for children (the encoders)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / TICK


def life_cpu(pool: Pool) -> dict[str, float]:
    g = groups(pool)
    return {"agent": cpu_seconds(g["workers"] + g["agent main"]), "store": cpu_seconds(g["store"])}


def receipts(text: str) -> dict[str, float]:
    """Recording id → when the agent got the store's receipt (``recording_uploaded``)."""
    return {
        rid: dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.UTC).timestamp()
        for stamp, event, rid in _EVENT.findall(text)
        if event == "recording_uploaded"
    }


_AUDIO = re.compile(
    r"event=(?:recording_finalized|recording_stored) recording_id=(\S+) .*?audio_s=([\d.]+)"
)


def audio_seconds(pool: Pool) -> dict[str, float]:
    """Recording id → seconds of audio: the agent's encoder (file path) or the store's
    archiver (live path) says how much it encoded."""
    store_log = pool.store_dir.parent / "logs" / "store.log"
    text = pool.text() + (store_log.read_text(errors="replace") if store_log.exists() else "")
    return {rid: float(seconds) for rid, seconds in _AUDIO.findall(text)}


_WAY = re.compile(r"^(fork|exec)(\+thread|\+loop)?(\+ptime(?:20|40|60))?$")
WAYS_HELP = "fork or exec, then +thread or +loop, then +ptime20, +ptime40 or +ptime60"


def pool_keys(way: str) -> dict[str, object]:
    """``[sip]`` keys of a way to run workers: fork or exec, then ``+thread`` (RTP read
    by pjmedia's media thread: ``media_thread = true``) or ``+loop`` (by the worker's
    own thread: ``false``), then ``+ptimeN`` (the bridge's frame, ``frame_ms = N``);
    what is left out: the default."""
    found = _WAY.match(way)
    if found is None:
        raise ValueError(f"way {way!r}: expected {WAYS_HELP}")
    start, media, ptime = found.groups()
    keys: dict[str, object] = {"worker_start": start}
    if media:
        keys["media_thread"] = media == "+thread"
    if ptime:
        keys["frame_ms"] = int(ptime.removeprefix("+ptime"))
    return keys


def run_step(root: Path, step: Step, seconds: int, rate: float, spread: int = 0) -> Step:
    calls, workers, path = step.calls, step.workers, step.path
    step.seconds = seconds
    speech = long_speech(root / "speech", seconds + math.ceil(calls / rate) + spread + 10)
    ready_s = 60.0 + workers
    where = root / f"step{calls}-{path}-{step.start}"
    runs = 1 + sum(1 for _ in root.glob(f"{where.name}*"))  # a way repeated in --start
    with running_pool(
        where.with_name(f"{where.name}-{runs}") if runs > 1 else where, workers, speech,
        ready_timeout=ready_s,
        sender=step.sender, rtp_timeout="10s", **pool_keys(step.start),
        rtp_port_count=RTP_PORTS_PER_WORKER,
        uplink={"live": True} if path == "live" else None, proxy=True,
    ) as pool:  # fmt: skip
        pool.wait_idle(timeout=ready_s)
        assert pool.sender is not None
        cpu_before = life_cpu(pool)
        result = place(pool, step, seconds, rate, spread)
        late = pool.sender.lateness()
        step.sender_late_s, step.sender_late_p50_s = late.max_s, late.p50_s
        step.sender_late_p99_s, step.sender_packets = late.p99_s, late.packets
        answered = [c for c in result.calls.values() if c.answered_at]
        step.call_minutes = (
            sum((c.bye_at or 0.0) - (c.answered_at or 0.0) for c in answered if c.bye_at) / 60
        )
        step.answered = len(answered)
        step.refused = sum(1 for c in result.calls.values() if c.refused_status)
        last_bye = max((c.bye_at or 0.0 for c in answered), default=time.time())
        rows = wait_stored(pool, [c.call_id for c in answered], timeout=120 + calls)
        step.drain_s = max((r.stored_at_ms / 1000 for r in rows.values()), default=0) - last_bye
        step.stored = len(rows)
        cpu_after = life_cpu(pool)
        step.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        got = receipts(pool.text())
        audio = audio_seconds(pool)
        step.wire_bytes = pool.proxy.bytes_up if pool.proxy else 0
        for c in answered:
            row = rows.get(c.call_id)
            if row is None or c.bye_at is None or c.answered_at is None:
                continue
            length = row.duration_ms / 1000 - (c.bye_at - c.answered_at)
            step.off += abs(length) > HOLDS_LENGTH_S
            step.start_off_s.append(row.started_at_ms / 1000 - c.answered_at)
            step.end_off_s.append(row.ended_at_ms / 1000 - c.bye_at)
            heard_off = audio.get(row.recording_id, math.nan) - (c.bye_at - c.answered_at)
            step.audio_off += not abs(heard_off) <= HOLDS_LENGTH_S
            length_ok = abs(length) <= WHOLE_LENGTH_S
            if length_ok and not flags(row):
                step.whole += 1
            else:
                heard = audio.get(row.recording_id, math.nan) - (c.bye_at - c.answered_at)
                step.audio_short += heard < -WHOLE_LENGTH_S
                if len(step.problems) < 5:
                    step.problems.append(
                        f"{row.recording_id} flags={row.flags or '-'} length_off_s={length:+.2f}"
                        f" audio_off_s={heard:+.2f}"
                    )
            step.archived_s.append(row.stored_at_ms / 1000 - c.bye_at)
            receipt = got.get(row.recording_id, row.stored_at_ms / 1000)
            step.safe_s.append(receipt - c.bye_at)
        rtp_figures(step, pool.text(), {call_ref(c.call_id) for c in answered})
        step.bye_late_s = [float(v) for v in _BYE_LATE.findall(pool.text())]
        byes = {
            rows[c.call_id].recording_id: c.bye_at
            for c in answered
            if c.call_id in rows and c.bye_at is not None
        }
        phase_times(step, pool.text(), byes)
    return step


def per_worker(usage: Usage) -> tuple[float, float]:
    n = max(1, usage.processes)
    return usage.cpu_pct / n, usage.pss_mb / n


def rows_of(steps: list[Step]) -> dict[str, tuple[list[str], Sequence[Sequence[object]]]]:
    load_cols = [
        "calls", "start", "workers", "recorded", "refused", "rx/sent", "worst stream",
        "lost (gaps)", "sender", "sender CPU %", "sender late p50/p99/max ms", "holds",
    ]  # fmt: skip
    cost_cols = [
        "calls", "start", "workers CPU %", "workers PSS MB", "zygote PSS MB", "front CPU %",
        "agent CPU %", "CPU % per call", "rtpengine", "floor", "host busy %", "load avg",
    ]  # fmt: skip
    safe_cols = [
        "calls", "start", "p50 s", "p99 s", "max s", "last BYE → all stored s",
        *(f"{name} p50/p99 s" for name in PHASES),
    ]  # fmt: skip
    load, cost, safe = [], [], []
    for s in steps:
        load.append([
            s.calls, s.start, s.workers, f"{s.whole}/{s.calls}", s.refused,
            f"{s.rx_ratio_total:.4f}", f"{s.rx_ratio_worst:.4f}",
            f"{s.lost / max(1, s.lost + s.received):.5f}", s.sender,
            s.busy["sender"].cpu_pct,
            f"{s.sender_late_p50_s * 1e3:.1f}/{s.sender_late_p99_s * 1e3:.1f}/"
            f"{s.sender_late_s * 1e3:.1f}",
            "yes" if s.holds else "NO: " + "; ".join(s.verdict()),
        ])  # fmt: skip
        busy = s.busy["workers"]
        cost.append([
            s.calls, s.start, busy.cpu_pct, busy.pss_mb, s.busy["zygote"].pss_mb,
            s.busy["front"].cpu_pct, s.busy["agent main"].cpu_pct,
            s.recorder("busy")[0] / s.calls, RTPENGINE_CALL_PCT, FLOOR_CALL_PCT,
            s.busy["host"].cpu_pct, s.load,
        ])  # fmt: skip
        safe.append([
            s.calls, s.start, percentile(s.safe_s, 50), percentile(s.safe_s, 99),
            max(s.safe_s, default=math.nan), s.drain_s,
            *(f"{percentile(s.phases.get(n, []), 50):.2f}/{percentile(s.phases.get(n, []), 99):.2f}"
              for n in PHASES),
        ])  # fmt: skip
    idle = [
        [s.calls, s.start, s.workers, *per_worker(s.idle["workers"]), s.idle["zygote"].pss_mb,
         s.idle["front"].cpu_pct, s.idle["front"].pss_mb, s.idle["agent main"].pss_mb]
        for s in steps
    ]  # fmt: skip
    idle_cols = [
        "calls", "start", "workers", "CPU %/worker", "PSS MB/worker", "zygote PSS MB",
        "front CPU %", "front PSS MB", "agent PSS MB",
    ]  # fmt: skip
    path_cols = [
        "path", "calls", "agent CPU %/call", "agent PSS MB/call", "store CPU %/call",
        "wire KB/call-min", "agent CPU s/call-min", "store CPU s/call-min",
        "BYE → safe p50/p99 s", "BYE → archived p50/p99 s",
    ]  # fmt: skip
    paths = [path_row(s) for s in steps]
    return {
        "Path: file (agent encodes, uploads at hang-up) or live (streams; store encodes)": (
            path_cols, paths,
        ),
        "Recording under load (calls stored whole / offered; RTP received / sent)": (
            load_cols, load,
        ),
        "Idle pool before the calls": (idle_cols, idle),
        "Cost with every call up (CPU in % of one core; per call: the whole recorder)": (
            cost_cols, cost,
        ),
        "Hang-up → safe (SIPp's BYE → the store's durable receipt)": (safe_cols, safe),
        "Capacity (the largest step that held)": (CAPACITY_COLS, capacity_rows(steps)),
    }  # fmt: skip


CAPACITY_COLS = [
    "start", "largest step held", "first drop", "recorder cores", "recorder GB",
    "calls per recorder core", "calls per GB", "calls per host core", "CPU % per call",
]  # fmt: skip


def capacity(steps: list[Step], start: str) -> dict[str, object]:
    """The largest step that held for one way of starting workers, per core and GB."""
    mine = [s for s in steps if s.start == start]
    held = max((s for s in mine if s.holds), key=lambda s: s.calls, default=None)
    drop = next((s.calls for s in mine if not s.holds), None)
    if held is None:
        return {"start": start, "largest_held": None, "first_drop": drop}
    cpu, pss = held.recorder("busy")
    cores, gb = cpu / 100, pss / 1024
    return {
        "start": start,
        "largest_held": held.calls,
        "first_drop": drop,
        "recorder_cores": round(cores, 3),
        "recorder_gb": round(gb, 3),
        "calls_per_recorder_core": round(held.calls / cores, 1) if cores else None,
        "calls_per_gb": round(held.calls / gb, 1) if gb else None,
        "calls_per_host_core": round(held.calls / (os.cpu_count() or 1), 1),
        "cpu_pct_per_call": round(cpu / held.calls, 4),
        "rtpengine_cpu_pct_per_call": RTPENGINE_CALL_PCT,
        "floor_cpu_pct_per_call": round(FLOOR_CALL_PCT, 4),
        "load_average": round(held.load, 2),
    }


def capacity_rows(steps: list[Step]) -> list[list[object]]:
    rows: list[list[object]] = []
    for start in dict.fromkeys(s.start for s in steps):
        c = capacity(steps, start)
        keys = (
            "largest_held", "first_drop", "recorder_cores", "recorder_gb",
            "calls_per_recorder_core", "calls_per_gb", "calls_per_host_core", "cpu_pct_per_call",
        )  # fmt: skip
        rows.append([start, *(("-" if c.get(k) is None else c.get(k)) for k in keys)])
    return rows


def path_figures(s: Step) -> dict[str, float]:
    """Per concurrent call: the agent host's cost (workers + main), the store's, the wire."""
    agent_cpu = s.busy["workers"].cpu_pct + s.busy["agent main"].cpu_pct
    agent_pss = (
        s.busy["workers"].pss_mb + s.busy["agent main"].pss_mb
        - s.idle["workers"].pss_mb - s.idle["agent main"].pss_mb
    )  # fmt: skip
    minutes = s.call_minutes or max(1, s.whole) * s.seconds / 60
    return {
        "agent_cpu_pct_per_call": agent_cpu / s.calls,
        "agent_pss_mb_per_call": agent_pss / s.calls,
        "store_cpu_pct_per_call": s.busy["store"].cpu_pct / s.calls if "store" in s.busy else 0.0,
        "wire_kb_per_call_minute": s.wire_bytes / 1024 / minutes,
        "agent_cpu_s_per_call_minute": s.cpu_s.get("agent", math.nan) / minutes,
        "store_cpu_s_per_call_minute": s.cpu_s.get("store", math.nan) / minutes,
    }


def path_row(s: Step) -> list[object]:
    f = path_figures(s)
    return [
        s.path, s.calls, f"{f['agent_cpu_pct_per_call']:.3f}", f"{f['agent_pss_mb_per_call']:.2f}",
        f"{f['store_cpu_pct_per_call']:.3f}", f"{f['wire_kb_per_call_minute']:.0f}",
        f"{f['agent_cpu_s_per_call_minute']:.3f}", f"{f['store_cpu_s_per_call_minute']:.3f}",
        f"{percentile(s.safe_s, 50):.2f}/{percentile(s.safe_s, 99):.2f}",
        f"{percentile(s.archived_s, 50):.2f}/{percentile(s.archived_s, 99):.2f}",
    ]  # fmt: skip


def _spread(values: list[float]) -> list[float]:
    """p1, p50, p99 and the largest by magnitude (signed) of a list of offsets."""
    worst = max(values, key=abs, default=math.nan)
    return [*(round(percentile(values, q), 3) for q in (1, 50, 99)), round(worst, 3)]


def as_json(step: Step) -> dict[str, object]:
    usage = {
        phase: {k: vars(v) for k, v in figures.items()}
        for phase, figures in (("idle", step.idle), ("busy", step.busy))
    }
    return {
        "path": step.path,
        **{k: round(v, 4) for k, v in path_figures(step).items()},
        "hangup_to_archived_p50_s": round(percentile(step.archived_s, 50), 3),
        "hangup_to_archived_p99_s": round(percentile(step.archived_s, 99), 3),
        "calls": step.calls,
        "start": step.start,
        "workers": step.workers,
        "load_average": round(step.load, 2),
        "answered": step.answered,
        "refused": step.refused,
        "stored": step.stored,
        "whole": step.whole,
        "length_off_over_0_2_s": step.off,
        "audio_off_over_0_2_s": step.audio_off,
        "start_off_p1_p50_p99_worst_s": _spread(step.start_off_s),
        "end_off_p1_p50_p99_worst_s": _spread(step.end_off_s),
        "end_off_over_0_2_s": sum(abs(v) > HOLDS_LENGTH_S for v in step.end_off_s),
        "start_off_over_0_2_s": sum(abs(v) > HOLDS_LENGTH_S for v in step.start_off_s),
        "bye_read_late_count_max_s": [len(step.bye_late_s), max(step.bye_late_s, default=0.0)],
        "not_whole_audio_short": step.audio_short,
        "streams": step.streams,
        "rx_over_sent": round(step.rx_ratio_total, 5),
        "worst_stream_rx_over_sent": round(step.rx_ratio_worst, 5),
        "packets_received": step.received,
        "packets_lost_gaps": step.lost,
        "sender": step.sender,
        "sender_cpu_pct": round(step.busy["sender"].cpu_pct, 2),
        "sender_packets": step.sender_packets,
        "sender_late_p50_s": round(step.sender_late_p50_s, 4),
        "sender_late_p99_s": round(step.sender_late_p99_s, 4),
        "sender_max_late_s": round(step.sender_late_s, 4),
        "hangup_to_safe_p50_s": round(percentile(step.safe_s, 50), 3),
        "hangup_to_safe_p99_s": round(percentile(step.safe_s, 99), 3),
        "hangup_to_safe_max_s": round(max(step.safe_s, default=math.nan), 3),
        "last_bye_to_all_stored_s": round(step.drain_s, 2),
        "phases_p50_p99_s": {
            name: [round(percentile(v, 50), 3), round(percentile(v, 99), 3)]
            for name, v in step.phases.items()
        },
        "holds": step.holds,
        "why_not": step.verdict(),
        "problems": step.problems,
        "usage": usage,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="100,200,300,400,500,600,700,800",
                        help="concurrent calls per step, in the order run")  # fmt: skip
    parser.add_argument("--seconds", type=int, default=40,
                        help="how long every call of a step is up at once")  # fmt: skip
    parser.add_argument("--rate", type=float, default=20.0, help="new calls per second")
    parser.add_argument(
        "--spread", type=int, default=0,
        help="calls last up to this many seconds more (uniform): hang-ups "
        "spread out as in steady traffic instead of all ending within seconds",
    )  # fmt: skip
    parser.add_argument(
        "--sender",
        choices=SENDERS,
        default="c",
        help="the RTP load generator: compiled (c) or one Python thread",
    )
    parser.add_argument("--start", default="fork",
                        help="how workers start: fork (the zygote), exec (each its own "
                        "Python) or exec,fork (both at every step, back to back); "
                        "+thread / +loop: [sip] media_thread = true / false; "
                        "+ptime40: [sip] frame_ms = 40")  # fmt: skip
    parser.add_argument("--safe-target", type=float, default=120.0,
                        help="seconds: hang-up → safe p99 of a step that holds")  # fmt: skip
    parser.add_argument("--keep-going", action="store_true",
                        help="run every step, also after one did not hold")  # fmt: skip
    parser.add_argument(
        "--path", default="file", help="file, live, or both (file then live, back to back)"
    )
    args = parser.parse_args(argv)
    ways = args.start.split(",")
    if not all(_WAY.match(way) for way in ways):
        parser.error(f"--start {args.start}: expected a list of ways, each {WAYS_HELP}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 sockets per call here
    started = time.monotonic()
    steps: list[Step] = []
    dropped: set[str] = set()
    failed: list[dict[str, object]] = []  # steps whose agent did not start
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        for calls in (int(n) for n in args.steps.split(",")):
            paths = ("file", "live") if args.path == "both" else (args.path,)
            for way, path in ((w, p) for w in ways if w not in dropped for p in paths):
                workers = math.ceil(calls / 4) + max(1, math.ceil(calls / 40))
                step = Step(calls, workers, way, args.safe_target, sender=args.sender, path=path)
                try:
                    run_step(Path(tmp), step, args.seconds, args.rate, args.spread)
                except AssertionError as exc:  # the agent gave up waiting for its workers
                    found = re.findall(r'reason="([^"]+)"', str(exc))
                    step.not_started = found[-1] if found else str(exc).split("\n")[0]
                    load = round(os.getloadavg()[0], 2)
                    failed.append({"calls": calls, "start": way, "why": step.not_started,
                                   "load_average": load})  # fmt: skip
                    print(f"step {calls} ({way}): agent did not start: {step.not_started}")
                    if not args.keep_going:
                        dropped.add(way)
                    continue
                steps.append(step)
                print(
                    json.dumps(as_json(step), default=str), flush=True
                )  # kept if a later step fails
                verdict = "holds" if step.holds else "does not hold: " + "; ".join(step.verdict())
                print(f"step {calls} ({way}): {step.whole}/{calls} whole, {verdict}", flush=True)
                if not step.holds and not args.keep_going:
                    dropped.add(way)
    result = {
        "call_seconds": args.seconds,
        "rate_calls_per_s": args.rate,
        "call_spread_s": args.spread,
        "sender": args.sender,
        "safe_target_s": args.safe_target,
        "capacity": {way: capacity(steps, way) for way in ways},
        "agent_did_not_start": failed,
        "first_step_that_drops": {
            way: next((s.calls for s in steps if s.start == way and not s.holds), None)
            for way in ways
        },
        "path": args.path,
        "steps": [as_json(s) for s in steps],
    }
    emit("concurrent recording", MODULE, rows_of(steps), result, ("sipp", "kamailio"), started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
