"""Benchmark: the store as 1, 2 and 3 replicas behind HAProxy, side by side (the same
script, the same load), and the sweep rate of 1 and 3 sweepers on one catalog.

For each replica count: a fresh PostgreSQL database and SeaweedFS bucket, that many
`callrec store` processes behind a real HAProxy (``tests.support.replicas``: TCP mode,
TLS passed through, round robin per connection), and ``--clients`` agent connections
with ``--workers`` upload threads each (the real ``Uplink`` in-process, mutual TLS):

* burst: ``--recordings`` outbox entries at once, each ``--kib`` KiB (a short call in
  Opus); throughput = recordings / time until the outbox is empty; the stores' and the
  balancer's CPU seconds over that time;
* paced: ``--paced`` recordings arriving at ``--rate`` per second, as hang-ups put
  them in the outbox; hang-up→safe = the store's receipt minus the arrival (p50, p95).

Sweep: ``--expired`` recordings past their retention put in through the vault, then
1 (and, on a second catalog, 3) ``callrec sweep --once`` processes at once; rate =
destroyed / time from the first sweeper ready to the last sweep's end (their log
lines; process start-up is reported apart as wall_s); every one destroyed and
audited once.

PostgreSQL runs with fsync off (as in the tests) and everything shares this machine's
cores with the load generator, so the figures compare the replica counts with each
other; they are not a capacity statement for separate hosts.

    .venv/bin/python -m tests.bench.replicas [--recordings 600] [--replicas 1,2,3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from agent.config import load_store_config
from agent.store.archive.vault import Storage, open_storage
from agent.store.audit.chain import audit_events
from agent.store.catalog import now_ms
from tests.bench.common import TICK, emit, percentile, sample
from tests.support.access_world import PEOPLE
from tests.support.pki import Pki, make_pki
from tests.support.replicas import Agents, StoreReplicas
from tests.support.services import Postgres, SeaweedFS, make_row, write_store_toml
from tests.support.stack import Keys, make_keys

MODULE = "tests.bench.replicas"


@dataclass(frozen=True)
class Services:
    pg: Postgres
    s3: SeaweedFS
    pki: Pki
    keys: Keys


def shared_config(root: Path, services: Services) -> dict[str, Any]:
    pg, s3 = services.pg, services.s3
    (root / "store-keys").mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    return {
        "catalog": pg.new_database(),
        "blobs": "s3",
        "s3": s3.s3_section(s3.new_bucket()),
        "keys": {"master_key_file": str(root / "store-keys" / "master.key")},
        "tls": services.pki.store_tls,
        "sweep_by": "timer",  # no sweeping while uploads are measured
    }


def cpu_s(pids: Sequence[int]) -> float:
    ticks = 0
    for pid in pids:
        found = sample(pid)
        ticks += found.cpu_ticks if found is not None else 0
    return ticks / TICK


def run_uploads(
    args: argparse.Namespace, root: Path, count: int, services: Services
) -> dict[str, Any]:
    stores = StoreReplicas(root, count, shared_config(root, services))
    open_storage(load_store_config(stores.config_file(0))).catalog.close()  # the one key
    stores.start()
    try:
        agents = Agents(
            root / "agent", services.keys, services.pki, stores.address, args.clients, args.workers
        )
        agents.start()
        try:
            for _ in range(args.clients * 2):  # warm-up: connections, TLS, pools
                agents.add(os.urandom(args.kib * 1024))
            agents.wait_empty(120)
            pids = [r.daemon.process.pid for r in stores.replicas if r.daemon.process]
            pids.append(stores.balancer.process.pid if stores.balancer.process else 0)
            cpu_before, started = cpu_s(pids), time.monotonic()
            for _ in range(args.recordings):
                agents.add(os.urandom(args.kib * 1024))
            agents.wait_empty(600)
            burst_s = time.monotonic() - started
            cpu = cpu_s(pids) - cpu_before
            paced = []
            for _ in range(args.paced):
                paced.append(agents.add(os.urandom(args.kib * 1024)))
                time.sleep(1 / args.rate)
            agents.wait_empty(600)
            latency = [agents.safe_at[r] - agents.ready_at[r] for r in paced]
        finally:
            agents.close()
    finally:
        stores.close()
    return {
        "replicas": count,
        "recordings": args.recordings,
        "kib": args.kib,
        "burst_s": round(burst_s, 2),
        "per_s": round(args.recordings / burst_s, 1),
        "mb_s": round(args.recordings * args.kib * 1024 / burst_s / 1e6, 2),
        "store_cpu_s": round(cpu, 1),
        "paced_rate": args.rate,
        "hangup_to_safe_p50_s": round(percentile(latency, 50), 3),
        "hangup_to_safe_p95_s": round(percentile(latency, 95), 3),
    }


def seed_expired(storage: Storage, root: Path, count: int) -> set[str]:
    made = set()
    ended = now_ms() - 220 * 86_400_000
    for n in range(count):
        rid = secrets.token_hex(16)
        source = root / f"{rid}.src"
        source.write_bytes(os.urandom(4000))
        blob_key = storage.vault.store(rid, source, root)
        source.unlink(missing_ok=True)
        assert storage.catalog.insert(make_row(rid, blob_key, ended - n))
        made.add(rid)
    return made


def run_sweep(
    args: argparse.Namespace, root: Path, sweepers: int, services: Services
) -> dict[str, Any]:
    shared = shared_config(root, services)
    config_file = write_store_toml(
        root / "store.toml",
        {**shared, "listen": "127.0.0.1:0", "data_dir": str(root / "data"),
         "sweep_batch": args.sweep_batch},
    )  # fmt: skip
    storage = open_storage(load_store_config(config_file))
    try:
        expired = seed_expired(storage, root, args.expired)
        command = [sys.executable, "-m", "agent.cli", "sweep", "--once", "--config"]
        logs = [root / f"sweeper-{i}.log" for i in range(sweepers)]
        started = time.monotonic()
        procs = []
        for log in logs:
            with log.open("w") as out:
                procs.append(subprocess.Popen([*command, str(config_file)], stdout=out,
                                              stderr=subprocess.STDOUT))  # fmt: skip
        codes = [p.wait(600) for p in procs]
        wall = time.monotonic() - started
        sweep_s = sweeping_time([log.read_text() for log in logs])
        with storage.catalog.engine.connect() as conn:
            rows = conn.execute(
                sa.select(audit_events.c.recording_id, audit_events.c.actor).where(
                    audit_events.c.action == "destroy"
                )
            ).all()
        left = {r.recording_id for r in storage.catalog.list(limit=1_000_000)} & expired
    finally:
        storage.catalog.close()
    destroyed = [r.recording_id for r in rows]
    assert codes == [0] * sweepers, codes
    assert not left and sorted(destroyed) == sorted(expired), "each destroyed, audited once"
    return {
        "sweepers": sweepers,
        "expired": args.expired,
        "wall_s": round(wall, 2),
        "sweep_s": round(sweep_s, 2),
        "per_s": round(len(destroyed) / sweep_s, 1),
        "actors": len({r.actor for r in rows}),
    }


def _stamps(text: str, event: str) -> list[dt.datetime]:
    found = re.findall(rf"^(\S+Z) \S+ (?:level=\S+ )?event={event}\b", text, re.M)
    return [dt.datetime.fromisoformat(s.replace("Z", "+00:00")) for s in found]


def sweeping_time(texts: list[str]) -> float:
    """From the first sweeper ready (its master keys opened) to the last sweep's end,
    from the sweepers' own log lines: the processes' start-up is not sweeping."""
    ready = min(t for text in texts for t in _stamps(text, "master_keys_opened"))
    done = max(t for text in texts for t in _stamps(text, "sweep_done"))
    return (done - ready).total_seconds()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, side by side")
    parser.add_argument("--recordings", type=int, default=600, help="the burst")
    parser.add_argument("--kib", type=int, default=30, help="size of each recording")
    parser.add_argument("--paced", type=int, default=60, help="recordings at --rate")
    parser.add_argument("--rate", type=float, default=10.0, help="paced arrivals per second")
    parser.add_argument("--clients", type=int, default=6, help="agent connections")
    parser.add_argument("--workers", type=int, default=2, help="upload threads per connection")
    parser.add_argument("--expired", type=int, default=600, help="recordings to sweep")
    parser.add_argument("--sweepers", default="1,3", help="sweeper processes at once")
    parser.add_argument("--sweep-batch", type=int, default=50)
    args = parser.parse_args(argv)
    started = time.monotonic()
    pg, s3 = Postgres(), SeaweedFS()
    uploads, sweeps = [], []
    with tempfile.TemporaryDirectory(prefix="callrec-bench-replicas-") as tmp:
        root = Path(tmp)
        (root / "people.toml").write_text(PEOPLE)
        services = Services(pg, s3, make_pki(root / "pki"), make_keys(root / "seal"))
        try:
            pg.start()
            s3.start()
            for count in (int(n) for n in args.replicas.split(",")):
                uploads.append(run_uploads(args, root / f"up-{count}", count, services))
                print(f"{count} replica(s): {uploads[-1]}", file=sys.stderr)
            for n in (int(s) for s in args.sweepers.split(",")):
                sweeps.append(run_sweep(args, root / f"sweep-{n}", n, services))
                print(f"{n} sweeper(s): {sweeps[-1]}", file=sys.stderr)
        finally:
            s3.stop()
            pg.stop()
    up_cols = ["replicas", "recordings", "per_s", "mb_s", "store_cpu_s",
               "hangup_to_safe_p50_s", "hangup_to_safe_p95_s"]  # fmt: skip
    sweep_cols = ["sweepers", "expired", "wall_s", "sweep_s", "per_s", "actors"]
    emit(
        "replicas",
        MODULE,
        {
            f"uploads through HAProxy ({args.kib} KiB each, {args.clients} connections x "
            f"{args.workers} threads; paced at {args.rate:g}/s)": (
                up_cols,
                [[u[c] for c in up_cols] for u in uploads],
            ),
            "sweep (one catalog, `callrec sweep --once` processes at once)": (
                sweep_cols,
                [[s[c] for c in sweep_cols] for s in sweeps],
            ),
        },
        {"uploads": uploads, "sweeps": sweeps},
        tools=["postgres"],
        started=started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
