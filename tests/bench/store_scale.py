"""Benchmark: the central store's catalog at scale, on SQLite and on PostgreSQL.

For each backend it builds a catalog of ``--rows`` recordings (and a second one of
``--small-rows``) through the real schema (``Catalog.migrate()``, the Alembic
migrations), with bulk inserts (SQLite ``executemany`` in 50,000-row transactions,
PostgreSQL ``COPY``). The data: calls spread over seven months ending now, exactly
``--expired`` of them past the six-month retention; 400 employees in 40 teams (a
generated directory, 5 % of calls transferred to a second employee); 200,000 customer
numbers masked, their last digits sealed to a seal key that was rotated three months
ago (``agent.store.keys.numbers``: the store's keyring holds both keys; each customer's
tail is sealed once and reused, which changes nothing for a find); one ``data_keys``
row per recording as ingest writes it.

Then, on the big catalog:

* the privacy officer's "find" (``FindByNumber``): a number in some written format
  and a time, normalised, and found with ``numbers.find_calls`` (the calls with its
  masked form in the window, their sealed tails opened and compared);
* a supervisor's search of one team's 7-day window (``access_queries.search`` with
  the supervisor's ``scope_of``), with and without the team filter;

and on both catalogs the real sweeper (``Sweeper.run_once``, what ``callrec sweep
--once`` runs) destroying the expired recordings, then ``audit.verify``. Blobs are on
the files backend; by default the blob files are NOT created, which the sweeper handles
(``FileBlobs.delete`` of a missing file is a no-op, the row still goes and is audited);
``--blob-files`` creates a small file per expired recording first.

PostgreSQL runs as a private cluster on loopback (``tests.support.services.Postgres``:
fsync off, as in the tests). SQLite runs with the store's pragmas (WAL,
synchronous=FULL) on the local disk; the load itself uses synchronous=OFF.

    .venv/bin/python -m tests.bench.store_scale [--rows 1000000] [--backend both]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.config import StoreConfig
from agent.directory import Directory, Person
from agent.privacy import Sealer, mask, new_seal_keypair, normalise
from agent.store.access import queries as q
from agent.store.access.rules import scope_of
from agent.store.archive.blobs import FileBlobs
from agent.store.archive.vault import Vault
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog, data_keys, recordings
from agent.store.keys.master import FileKeyWrapper
from agent.store.keys.numbers import SealKeyring, candidates_query, find_calls
from agent.store.retention.schedule import add_months, datetime_to_ms, expired_ranges
from agent.store.retention.sweeper import Sweeper, expired_clause
from tests.bench.common import emit, percentile
from tests.support.services import Postgres

MODULE = "tests.bench.store_scale"
SWEEP_BATCH = StoreConfig.sweep_batch  # the store's default
DAY_MS = 86_400_000
RETENTION_MONTHS = 6
TEAMS = 40
PER_TEAM = 10
CUSTOMERS = 200_000
CHUNK = 50_000
COLUMNS = [c.name for c in recordings.columns]
KEY_COLUMNS = [c.name for c in data_keys.columns]


# ---------------------------------------------------------------- the generated world


@dataclasses.dataclass
class World:
    """Directory, customers and keys shared by every catalog of one run."""

    now: dt.datetime
    directory: Directory
    agents: list[Person]
    keyring: SealKeyring  # (new key, old key)
    sealers: tuple[Sealer, Sealer]  # (new, old)
    numbers: list[str]  # E.164
    masked: list[str]
    rotated_ms: int  # calls before this were sealed to the old key
    sealed: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)

    def seal(self, customer: int, started_ms: int) -> str:
        """The customer's tail sealed to the key of the call's time (once per pair)."""
        which = 0 if started_ms >= self.rotated_ms else 1
        key = (customer, which)
        if key not in self.sealed:
            self.sealed[key] = self.sealers[which].seal(self.numbers[customer][-3:])
        return self.sealed[key]

    @classmethod
    def make(cls, rng: random.Random) -> World:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        people: list[dict[str, Any]] = []
        for t in range(TEAMS):
            team, boss = f"team-{t:02d}", f"e{1000 + t * PER_TEAM}"
            for i in range(PER_TEAM):
                pid = f"e{1000 + t * PER_TEAM + i}"
                people.append(
                    {
                        "id": pid,
                        "name": f"Employee {pid}",
                        "team": team,
                        "role": "supervisor" if pid == boss else "agent",
                        "trained": dt.date(2026, 1, 15),
                        "aors": [f"sip:{pid}@pbx.example"],
                        **({} if pid == boss else {"supervisor": boss}),
                    }
                )
        directory = Directory.from_dict({"person": people})
        agents = [p for p in directory.people.values()]
        pairs = [new_seal_keypair() for _ in range(2)]  # (new, old)
        keyring = SealKeyring(tuple(_private(p) for p, _ in pairs))
        sealers = (Sealer(_public(pairs[0][1])), Sealer(_public(pairs[1][1])))
        numbers = sorted({f"+35840{rng.randrange(10**7):07d}" for _ in range(CUSTOMERS * 2)})[
            :CUSTOMERS
        ]
        rng.shuffle(numbers)
        rotated = datetime_to_ms(add_months(now, -3))
        masked = [mask(n) for n in numbers]
        return cls(now, directory, agents, keyring, sealers, numbers, masked, rotated)

    @property
    def now_ms(self) -> int:
        return datetime_to_ms(self.now)

    def supervisors(self) -> list[Person]:
        return [p for p in self.agents if p.role.value == "supervisor"]


@dataclasses.dataclass(frozen=True)
class Sample:
    customer: int
    recording_id: str
    started_at_ms: int
    ended_at_ms: int


def time_bounds(world: World) -> tuple[tuple[int, int], tuple[int, int]]:
    """(expired span, live span) of end times, a day clear of the expiry boundary."""
    ranges = expired_ranges(world.now_ms, RETENTION_MONTHS)
    first_high = ranges[0][1]
    last_high = max(high for _, high in ranges)
    seven = datetime_to_ms(add_months(world.now, -(RETENTION_MONTHS + 1)))
    return (seven, first_high - DAY_MS), (last_high + DAY_MS, world.now_ms - 60_000)


def generate(
    world: World, rng: random.Random, rows: int, expired: int, samples: list[Sample]
) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Chunks of (recording rows, data-key rows) in column order."""
    (e_lo, e_hi), (l_lo, l_hi) = time_bounds(world)
    for start in range(0, rows, CHUNK):
        recs: list[tuple[Any, ...]] = []
        keys: list[tuple[Any, ...]] = []
        for i in range(start, min(rows, start + CHUNK)):
            ended = rng.randrange(e_lo, e_hi) if i < expired else rng.randrange(l_lo, l_hi)
            started = ended - int(min(3_600_000, rng.lognormvariate(12.0, 0.8)))
            rid = f"{rng.getrandbits(128):032x}"
            blob_key = f"{rid}-{rng.getrandbits(32):08x}"
            who = rng.choice(world.agents)
            employees = [_employee(who, started)]
            if rng.random() < 0.05:
                employees.append(_employee(rng.choice(world.agents), started + 60_000))
            c = rng.randrange(CUSTOMERS)
            stored = ended + rng.randrange(2_000, 120_000)
            if i >= expired and rng.random() < 0.002 and len(samples) < 5_000:
                samples.append(Sample(c, rid, started, ended))
            recs.append(
                (
                    rid,
                    "hel-1",
                    "siprec",
                    f"{rng.getrandbits(64):016x}",
                    "inbound",
                    started,
                    ended,
                    "+3581005577",
                    "number",
                    world.masked[c],
                    None,
                    None,
                    world.seal(c, started),
                    who.id,
                    who.name,
                    who.team,
                    json.dumps(employees),
                    "one_way_audio" if rng.random() < 0.01 else "",
                    "opus",
                    2,
                    (ended - started) * 3,
                    hashlib.sha256(blob_key.encode()).hexdigest(),
                    blob_key,
                    "fi",
                    stored,
                    False,
                    False,
                    None,
                    None,
                    None,  # pauses_json: none paused
                )
            )
            keys.append((blob_key, rid, "m1", rng.randbytes(60), stored - 1_000, None))
        yield recs, keys


def _private(pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _public(pem: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def _employee(person: Person, at_ms: int) -> dict[str, Any]:
    joined = dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
    aor = person.aors[0]
    return {
        "id": person.id,
        "name": person.name,
        "aor": aor,
        "team": person.team,
        "joined_at": joined,
    }


# ---------------------------------------------------------------- loading


def load(catalog: Catalog, chunks: Iterator[tuple[list[Any], list[Any]]]) -> None:
    raw = catalog.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        if catalog.dialect == "sqlite":
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA cache_size=-1048576")  # 1 GiB, for this load only
            for table, cols, rows in _tables(chunks):
                marks = ",".join("?" * len(cols))
                conn.executemany(f"INSERT INTO {table} ({','.join(cols)}) VALUES ({marks})", rows)
                conn.commit()
        else:
            for table, cols, rows in _tables(chunks):
                with (
                    conn.cursor() as cur,
                    cur.copy(f"COPY {table} ({','.join(cols)}) FROM STDIN") as copy,
                ):
                    for row in rows:
                        copy.write_row(row)
                conn.commit()
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE")
            conn.autocommit = False
    finally:
        raw.close()
    catalog.engine.dispose()  # the load's pragmas go with its connection


def _tables(
    chunks: Iterator[tuple[list[Any], list[Any]]],
) -> Iterator[tuple[str, list[str], list[Any]]]:
    for recs, keys in chunks:
        yield "data_keys", KEY_COLUMNS, keys  # written before the row, as ingest does
        yield "recordings", COLUMNS, recs


# ---------------------------------------------------------------- measurements


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def written(number: str, rng: random.Random) -> str:
    """The number as a data subject might write it."""
    national = "0" + number[4:]
    return rng.choice(
        [
            number,
            f"{national[:3]} {national[3:6]} {national[6:]}",
            "00" + number[1:],
            f"+358 {number[4:6]} {number[6:]}",
            national,
        ]
    )


def dsr_lookups(
    catalog: Catalog, world: World, samples: Sequence[Sample], n: int, rng: random.Random
) -> list[float]:
    times: list[float] = []
    for s in rng.sample(list(samples), min(n, len(samples))):
        raw = written(world.numbers[s.customer], rng)
        at_ms = rng.randrange(s.started_at_ms, s.ended_at_ms + 1)

        def find(raw: str = raw, at_ms: int = at_ms) -> list[Any]:
            number = normalise(raw, "FI")
            assert number.e164 is not None, raw
            found = find_calls(catalog, world.keyring, number.e164, at_ms, 15 * 60_000)
            return found.rows

        took, rows = timed(find)
        assert s.recording_id in {r.recording_id for r in rows}, "lookup missed its call"
        times.append(took)
    return times


def team_searches(
    catalog: Catalog, world: World, n: int, rng: random.Random, team_filter: bool
) -> tuple[list[float], float]:
    (_, _), (l_lo, l_hi) = time_bounds(world)
    times: list[float] = []
    found = 0
    bosses = world.supervisors()
    for _ in range(n):
        boss = rng.choice(bosses)
        since = rng.randrange(l_lo, l_hi - 7 * DAY_MS)
        filters = q.Filters(
            since_ms=since,
            until_ms=since + 7 * DAY_MS,
            team=(boss.team or "") if team_filter else "",
        )
        scope = scope_of(boss, world.directory)
        took, (rows, _more) = timed(lambda: q.search(catalog, filters, scope, 100))  # noqa: B023
        times.append(took)
        found += len(rows)
    return times, found / max(1, n)


class StepTimer:
    """Wraps a sweeper's steps to say where the time went."""

    def __init__(self, sweeper: Sweeper) -> None:
        self.spent: dict[str, float] = {}
        for name in ("_claim", "_finish", "_remove_orphans", "_measure", "_finish_pending"):
            setattr(sweeper, name, self._wrap(name, getattr(sweeper, name)))
        blobs = sweeper.vault.blobs
        blobs.delete = self._wrap("blob_delete", blobs.delete)  # type: ignore[method-assign]

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0

        return run


def sweep(
    catalog: Catalog, world: World, root: Path, batch: int, blob_files: bool
) -> dict[str, Any]:
    blobs = FileBlobs(root / "blobs", "fi")
    made = 0
    if blob_files:
        with catalog.engine.connect() as conn:
            expired_keys = conn.execute(
                sa.select(recordings.c.blob_key).where(expired_now(world))
            ).scalars()
            for key in expired_keys:
                path = blobs.root / key[:2] / key
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(b"x" * 64)
                made += 1
    wrapper = FileKeyWrapper((("m1", bytes(32)),))
    sweeper = Sweeper(
        catalog,
        Vault(catalog, blobs, wrapper),
        RETENTION_MONTHS,
        batch=batch,
        clock=lambda: world.now,
        actor="system:sweeper@bench",
    )
    steps = StepTimer(sweeper)
    took, report = timed(sweeper.run_once)
    left_files = sum(1 for _ in blobs.root.glob("*/*")) if blob_files else 0
    with catalog.engine.connect() as conn:
        remaining = conn.execute(sa.select(sa.func.count()).select_from(recordings)).scalar_one()
        keys_left = conn.execute(sa.select(sa.func.count()).select_from(data_keys)).scalar_one()
    verify_s, verdict = timed(lambda: audit.verify(catalog))
    return {
        "seconds": took,
        "destroyed": report.destroyed,
        "failed": report.failed,
        "remaining": remaining,
        "keys_left": keys_left,
        "blob_files": made,
        "blob_files_left": left_files,
        "audit_entries": verdict.entries,
        "audit_ok": verdict.ok,
        "verify_s": verify_s,
        "steps": steps.spent,
    }


def expired_now(world: World) -> sa.ColumnElement[bool]:
    return expired_clause(world.now_ms, RETENTION_MONTHS)


def count_expired(catalog: Catalog, world: World) -> int:
    with catalog.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(recordings).where(expired_now(world))
        return int(conn.execute(query).scalar_one())


def plans(catalog: Catalog, world: World) -> dict[str, str]:
    """The query plans of the measured statements (EXPLAIN / EXPLAIN QUERY PLAN)."""
    boss = world.supervisors()[0]
    since = world.now_ms - 14 * DAY_MS
    search = (
        q._filtered(
            q.Filters(since_ms=since, until_ms=since + 7 * DAY_MS, team=boss.team or ""),
            scope_of(boss, world.directory),
        )
        .order_by(recordings.c.started_at_ms.desc(), recordings.c.recording_id.desc())
        .limit(500)
    )
    scope_only = (
        q._filtered(
            q.Filters(since_ms=since, until_ms=since + 7 * DAY_MS),
            scope_of(boss, world.directory),
        )
        .order_by(recordings.c.started_at_ms.desc(), recordings.c.recording_id.desc())
        .limit(500)
    )
    c = recordings.c
    dsr = candidates_query(world.masked[0], since, 900_000, 2001)
    first_high = expired_ranges(world.now_ms, RETENTION_MONTHS)[0][1]
    pick = (  # the sweeper's first claim of a run (the oldest expired range)
        sa.select(c.recording_id)
        .where(c.destroy_reason.is_(None), c.legal_hold.is_(sa.false()))
        .where(c.ended_at_ms <= first_high)
        .order_by(c.ended_at_ms)
        .limit(200)
    )
    found = {}
    prefix = "EXPLAIN QUERY PLAN " if catalog.dialect == "sqlite" else "EXPLAIN "
    with catalog.engine.connect() as conn:
        for name, stmt in (
            ("dsr", dsr),
            ("team_search", search),
            ("scope_search", scope_only),
            ("sweep_claim", pick),
        ):
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            rows = conn.execute(sa.text(prefix + sql)).all()
            found[name] = " | ".join(str(r[-1]) for r in rows)
    return found


# ---------------------------------------------------------------- one backend


@contextlib.contextmanager
def backend_urls(name: str, root: Path) -> Iterator[Callable[[str], str]]:
    if name == "sqlite":
        yield lambda label: f"sqlite:///{root / label / 'catalog.db'}"
        return
    pg = Postgres()
    try:
        pg.start()
        yield lambda _label: pg.new_database()
    finally:
        pg.stop()


def run_catalog(
    args: argparse.Namespace, world: World, url: str, root: Path, rows: int, big: bool
) -> dict[str, Any]:
    rng = random.Random(args.seed + rows)
    catalog = Catalog(url)
    out: dict[str, Any] = {"rows": rows, "expired": args.expired}
    try:
        out["migrate_s"], _ = timed(catalog.migrate)
        samples: list[Sample] = []
        out["load_s"], _ = timed(
            lambda: load(catalog, generate(world, rng, rows, args.expired, samples))
        )
        out["expired_counted"] = count_expired(catalog, world)
        assert out["expired_counted"] == args.expired, out
        if big:
            out["plans"] = plans(catalog, world)
            out["dsr"] = dsr_lookups(catalog, world, samples, args.lookups, rng)
            out["team"] = team_searches(catalog, world, args.searches, rng, True)
            out["scope"] = team_searches(catalog, world, args.searches, rng, False)
        out["sweep"] = sweep(catalog, world, root, args.sweep_batch, args.blob_files)
    finally:
        catalog.close()
    return out


def run_backend(args: argparse.Namespace, world: World, name: str) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"callrec-bench-{name}-"))
    found: dict[str, Any] = {}
    try:
        with backend_urls(name, root) as url_for:
            for label, rows in (("big", args.rows), ("small", args.small_rows)):
                (root / label).mkdir()
                url = url_for(label)
                found[label] = run_catalog(args, world, url, root / label, rows, label == "big")
                print(f"# {name} {label}: {_brief(found[label])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return found


def _brief(r: dict[str, Any]) -> str:
    s = r["sweep"]
    return (
        f"rows={r['rows']} load={r['load_s']:.1f}s sweep={s['seconds']:.1f}s "
        f"destroyed={s['destroyed']} steps={ {k: round(v, 1) for k, v in s['steps'].items()} }"
    )


# ---------------------------------------------------------------- output


def ms(values: Sequence[float], q_: float) -> float:
    return percentile(values, q_) * 1000


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], started: float) -> None:
    build, queries, sweeps, steps, plan_rows = [], [], [], [], []
    summary: dict[str, Any] = {}
    for name, found in results.items():
        big, small = found["big"], found["small"]
        for r in (big, small):
            rate = r["rows"] / r["load_s"]
            build.append(
                (
                    name,
                    r["rows"],
                    r["expired_counted"],
                    round(r["migrate_s"], 2),
                    round(r["load_s"], 1),
                    round(rate),
                )
            )
        dsr, (team, team_n), (scope, scope_n) = big["dsr"], big["team"], big["scope"]
        for what, values, per in (
            ("DSR find by number+time", dsr, 1.0),
            ("team week, team filter", team, team_n),
            ("team week, scope only", scope, scope_n),
        ):
            queries.append(
                (
                    name,
                    what,
                    len(values),
                    round(per, 1),
                    round(ms(values, 50), 2),
                    round(ms(values, 99), 2),
                    round(max(values) * 1000, 2),
                )
            )
        rates = []
        for r in (big, small):
            s = r["sweep"]
            rate = s["destroyed"] / s["seconds"]
            rates.append(rate)
            sweeps.append(
                (
                    name,
                    r["rows"],
                    s["destroyed"],
                    s["failed"],
                    s["remaining"],
                    s["audit_entries"],
                    "yes" if s["audit_ok"] else "NO",
                    round(s["seconds"], 1),
                    round(rate),
                    round(s["verify_s"], 1),
                )
            )
            steps.append(
                (
                    name,
                    r["rows"],
                    *(
                        round(s["steps"].get(k, 0.0), 1)
                        for k in (
                            "_finish_pending",
                            "_claim",
                            "blob_delete",
                            "_finish",
                            "_remove_orphans",
                            "_measure",
                        )
                    ),
                )
            )
        ratio = small["sweep"]["seconds"] / big["sweep"]["seconds"]
        sweeps.append((name, "ratio small/big time", "", "", "", "", "", round(ratio, 2), "", ""))
        for key, text in big["plans"].items():
            plan_rows.append((name, key, text[:150]))
        summary[name] = {
            "load_rows_per_s": {
                str(r["rows"]): round(r["rows"] / r["load_s"]) for r in (big, small)
            },
            "dsr_ms": {"p50": round(ms(dsr, 50), 3), "p99": round(ms(dsr, 99), 3), "n": len(dsr)},
            "team_week_ms": {"p50": round(ms(team, 50), 3), "p99": round(ms(team, 99), 3)},
            "scope_week_ms": {"p50": round(ms(scope, 50), 3), "p99": round(ms(scope, 99), 3)},
            "sweep": {str(r["rows"]): {k: v for k, v in r["sweep"].items()} for r in (big, small)},
            "sweep_rate_per_s": [round(x) for x in rates],
            "sweep_time_ratio_small_over_big": round(ratio, 3),
            "plans": big["plans"],
        }
    blob_note = (
        "blob files created for the expired rows"
        if args.blob_files
        else "blob files not created: the sweeper treats a missing blob as deleted"
    )
    emit(
        "store at scale",
        MODULE,
        {
            "Catalog build (bulk load through the migrated schema)": (
                ("backend", "rows", "expired", "migrate s", "load s", "rows/s"),
                build,
            ),
            "Queries on the big catalog (ms per call, median of the run's samples)": (
                ("backend", "query", "n", "rows/call", "p50 ms", "p99 ms", "max ms"),
                queries,
            ),
            f"Sweep (Sweeper.run_once, batch {args.sweep_batch}; {blob_note})": (
                (
                    "backend",
                    "rows",
                    "destroyed",
                    "failed",
                    "left",
                    "audit entries",
                    "chain ok",
                    "sweep s",
                    "rec/s",
                    "verify s",
                ),
                sweeps,
            ),
            "Sweep time by step (s)": (
                (
                    "backend",
                    "rows",
                    "pending",
                    "claim",
                    "blob delete",
                    "finish",
                    "orphans",
                    "measure",
                ),
                steps,
            ),
            "Query plans (big catalog)": (("backend", "query", "plan"), plan_rows),
        },
        {"options": vars(args), "backends": summary},
        tools=("postgres",) if "postgresql" in results else (),
        started=started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=250_000)
    parser.add_argument("--expired", type=int, default=100_000)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--lookups", type=int, default=300, help="DSR lookups to time")
    parser.add_argument("--searches", type=int, default=200, help="team searches to time")
    parser.add_argument(
        "--sweep-batch", type=int, default=SWEEP_BATCH, help="[store] sweep_batch (its default)"
    )
    parser.add_argument("--blob-files", action="store_true", help="create the expired blobs")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if not 0 < args.expired <= min(args.rows, args.small_rows):
        parser.error("--expired must be positive and at most --rows and --small-rows")
    started = time.monotonic()
    world = World.make(random.Random(args.seed))
    names = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    results = {name: run_backend(args, world, name) for name in names}
    report(args, results, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
