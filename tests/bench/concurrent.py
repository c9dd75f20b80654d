"""Benchmark: concurrent SIPREC calls through the SIP front into the agent, and the
time from hang-up to the store's durable receipt.

    .venv/bin/python -m tests.bench.concurrent                      # 25 → 400
    .venv/bin/python -m tests.bench.concurrent --steps 100 --seconds 40

For each step N, a fresh store and agent with ceil(N/4) workers plus 10 % spare behind
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

A step "holds" when every offered call was stored whole and every stream received
≥ 99 % of its packets; the first step that does not is where quality drops.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
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
HOLDS_RX = 0.99
_EVENT = re.compile(
    r"^(\S+)Z \S+ event=(call_recorded|recording_finalized|recording_uploaded) "
    r"recording_id=(\S+)",
    re.M,
)
EVENTS = ("call_recorded", "recording_finalized", "recording_uploaded")
PHASES = ("BYE → captured", "captured → finalized", "finalized → receipt")
_RECORDED = re.compile(
    r"event=call_recorded .*?call_ref=(\S+) duration_s=([\d.]+) .*?rtp_received_lost=(\S+)"
)


@dataclass
class Step:
    calls: int
    workers: int
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
    path: str = "file"
    archived_s: list[float] = field(default_factory=list)  # BYE → the store's stored_at
    wire_bytes: int = 0  # agent → store, through the proxy
    seconds: int = 0
    # CPU seconds over the whole step (calls placed → every call stored), children
    # (the encoders) included: "agent" = main process + workers, "store".
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def holds(self) -> bool:
        return self.whole == self.calls and self.rx_ratio_worst >= HOLDS_RX and not self.problems


def groups(pool: Pool) -> dict[str, list[int]]:
    front = int(re.findall(r"event=front_started pid=(\d+)", pool.text())[-1])
    return {
        "workers": list(pool.worker_pids().values()),
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
    call = pool.call(
        call_ms=seconds * 1000, call_ms_spread=spread * 1000, rtp_bind=False,
        accept_refusal=True,
    )  # fmt: skip
    ramp = step.calls / rate
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(
            pool.run, siprec_scenario(call), f"step{step.calls}", calls=step.calls,
            rate=rate, timeout_s=seconds + spread + ramp + 60,
        )  # fmt: skip
        time.sleep(ramp + 2.0)
        window = max(5.0, seconds - ramp - 5.0)
        step.busy = measure(groups(pool), window)
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


def run_step(
    root: Path, calls: int, seconds: int, rate: float, spread: int = 0, sender: str = "c",
    path: str = "file",
) -> Step:  # fmt: skip
    workers = math.ceil(calls / 4) + max(1, math.ceil(calls / 40))
    step = Step(calls, workers, sender=sender, path=path, seconds=seconds)
    speech = long_speech(root / "speech", seconds + spread + 10)
    ready_s = 60.0 + workers
    with running_pool(
        root / f"step{calls}-{path}", workers, speech, ready_timeout=ready_s, sender=sender,
        rtp_timeout="10s", uplink={"live": True} if path == "live" else None, proxy=True,
    ) as pool:  # fmt: skip
        pool.wait_idle(timeout=ready_s)
        assert pool.sender is not None
        cpu_before = life_cpu(pool)
        result = place(pool, step, seconds, rate, spread)
        late = pool.sender.lateness()
        step.sender_late_s, step.sender_late_p50_s = late.max_s, late.p50_s
        step.sender_late_p99_s, step.sender_packets = late.p99_s, late.packets
        answered = [c for c in result.calls.values() if c.answered_at]
        step.answered = len(answered)
        step.refused = sum(1 for c in result.calls.values() if c.refused_status)
        last_bye = max((c.bye_at or 0.0 for c in answered), default=time.time())
        rows = wait_stored(pool, [c.call_id for c in answered], timeout=120 + calls)
        step.drain_s = max((r.stored_at_ms / 1000 for r in rows.values()), default=0) - last_bye
        step.stored = len(rows)
        cpu_after = life_cpu(pool)
        step.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        got = receipts(pool.text())
        step.wire_bytes = pool.proxy.bytes_up if pool.proxy else 0
        for c in answered:
            row = rows.get(c.call_id)
            if row is None or c.bye_at is None or c.answered_at is None:
                continue
            length_ok = abs(row.duration_ms / 1000 - (c.bye_at - c.answered_at)) <= 0.5
            if length_ok and not flags(row):
                step.whole += 1
            elif len(step.problems) < 5:
                step.problems.append(f"{row.recording_id} flags={row.flags or '-'}")
            step.archived_s.append(row.stored_at_ms / 1000 - c.bye_at)
            receipt = got.get(row.recording_id, row.stored_at_ms / 1000)
            step.safe_s.append(receipt - c.bye_at)
        rtp_figures(step, pool.text(), {call_ref(c.call_id) for c in answered})
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
        "calls", "workers", "recorded", "refused", "rx/sent", "worst stream", "lost (gaps)",
        "sender", "sender CPU %", "sender late p50/p99/max ms", "holds",
    ]  # fmt: skip
    cost_cols = [
        "calls", "workers CPU %", "workers PSS MB", "front CPU %", "agent CPU %",
        "call/idle-worker CPU", "call/idle-worker PSS",
    ]  # fmt: skip
    safe_cols = [
        "calls", "p50 s", "p99 s", "max s", "last BYE → all stored s",
        *(f"{name} p50/p99 s" for name in PHASES),
    ]  # fmt: skip
    load, cost, safe = [], [], []
    for s in steps:
        load.append([
            s.calls, s.workers, f"{s.whole}/{s.calls}", s.refused,
            f"{s.rx_ratio_total:.4f}", f"{s.rx_ratio_worst:.4f}",
            f"{s.lost / max(1, s.lost + s.received):.5f}", s.sender,
            s.busy["sender"].cpu_pct,
            f"{s.sender_late_p50_s * 1e3:.1f}/{s.sender_late_p99_s * 1e3:.1f}/"
            f"{s.sender_late_s * 1e3:.1f}",
            "yes" if s.holds else "NO",
        ])  # fmt: skip
        idle_cpu, idle_pss = per_worker(s.idle["workers"])
        busy = s.busy["workers"]
        call_cpu = busy.cpu_pct / s.calls
        call_pss = (busy.pss_mb - s.idle["workers"].pss_mb) / s.calls
        cost.append([
            s.calls, busy.cpu_pct, busy.pss_mb, s.busy["front"].cpu_pct,
            s.busy["agent main"].cpu_pct,
            call_cpu / idle_cpu if idle_cpu else math.nan,
            call_pss / idle_pss if idle_pss else math.nan,
        ])  # fmt: skip
        safe.append([
            s.calls, percentile(s.safe_s, 50), percentile(s.safe_s, 99),
            max(s.safe_s, default=math.nan), s.drain_s,
            *(f"{percentile(s.phases.get(n, []), 50):.2f}/{percentile(s.phases.get(n, []), 99):.2f}"
              for n in PHASES),
        ])  # fmt: skip
    idle = [
        [s.calls, s.workers, *per_worker(s.idle["workers"]), s.idle["front"].cpu_pct,
         s.idle["front"].pss_mb, s.idle["agent main"].pss_mb]
        for s in steps
    ]  # fmt: skip
    idle_cols = [
        "calls", "workers", "CPU %/worker", "PSS MB/worker", "front CPU %", "front PSS MB",
        "agent PSS MB",
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
        "Cost with every call up (CPU in % of one core)": (cost_cols, cost),
        "Hang-up → safe (SIPp's BYE → the store's durable receipt)": (safe_cols, safe),
    }  # fmt: skip


def path_figures(s: Step) -> dict[str, float]:
    """Per concurrent call: the agent host's cost (workers + main), the store's, the wire."""
    agent_cpu = s.busy["workers"].cpu_pct + s.busy["agent main"].cpu_pct
    agent_pss = (
        s.busy["workers"].pss_mb + s.busy["agent main"].pss_mb
        - s.idle["workers"].pss_mb - s.idle["agent main"].pss_mb
    )  # fmt: skip
    minutes = max(1, s.whole) * s.seconds / 60
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
        "workers": step.workers,
        "answered": step.answered,
        "refused": step.refused,
        "stored": step.stored,
        "whole": step.whole,
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
        "problems": step.problems,
        "usage": usage,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="25,50,100,200,400", help="concurrent calls per step")
    parser.add_argument("--seconds", type=int, default=40, help="length of each call")
    parser.add_argument("--rate", type=float, default=20.0, help="new calls per second")
    parser.add_argument(
        "--spread", type=int, default=0,
        help="calls last --seconds plus up to this many seconds more (uniform): hang-ups "
        "spread out as in steady traffic instead of all ending within seconds",
    )  # fmt: skip
    parser.add_argument(
        "--sender",
        choices=SENDERS,
        default="c",
        help="the RTP load generator: compiled (c) or one Python thread",
    )
    parser.add_argument(
        "--path", default="file", help="file, live, or both (file then live, back to back)"
    )
    parser.add_argument("--stop-after-drop", action="store_true",
                        help="stop after the first step that does not hold")  # fmt: skip
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2 sockets per call here
    started = time.monotonic()
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as tmp:
        for calls in (int(n) for n in args.steps.split(",")):
            for path in ("file", "live") if args.path == "both" else (args.path,):
                step = run_step(
                    Path(tmp), calls, args.seconds, args.rate, args.spread, args.sender, path
                )
                steps.append(step)
                print(
                    f"step {calls} {path}: {step.whole}/{calls} whole, holds={step.holds}",
                    flush=True,
                )
            if args.stop_after_drop and not step.holds:
                break
    first_drop = next((s.calls for s in steps if not s.holds), None)
    result = {
        "call_seconds": args.seconds,
        "rate_calls_per_s": args.rate,
        "call_spread_s": args.spread,
        "sender": args.sender,
        "path": args.path,
        "first_step_that_drops": first_drop,
        "steps": [as_json(s) for s in steps],
    }
    print(f"quality first drops at: {first_drop or 'no step (all held)'}")
    emit("concurrent recording", MODULE, rows_of(steps), result, ("sipp", "kamailio"), started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
