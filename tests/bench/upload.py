"""Benchmark: upload throughput of one large recording, gRPC (mTLS) vs a plain TCP copy.

One recording of ``--mib`` MiB (random bytes: Opus audio does not compress) is put in
the agent's outbox as finalize leaves it (``audio.opus`` + ``manifest.json``) and the
real ``Uplink`` sends it over mutual TLS to the real store (``callrec store`` as a
subprocess, certificates as ``callrec certs`` makes them) until the store's durable
receipt removes it from the outbox. In the same run the same bytes go through a plain
TCP socket to a receiver process that writes them to a file and fsyncs it (the
"durable" of a bare copy) before it answers. Each repeat does both, alternating which
goes first; the figures are medians over the repeats.

The gRPC path is broken down (per repeat, then medians):
  stream  from the first request until gRPC pulled the finish message (the chunks
          are on the wire; the store wrote each one to incoming/<id>.part),
  finish  from the finish message until the receipt (the store verified the sha256,
          encrypted the blob, made it durable and inserted the row),
and the store's own figures from its ``recording_stored`` log line when it logs them
(store_recv_s: first chunk to finish; store_finish_s: sha256 check, encryption into
the blob store, fsync, catalog row), plus CPU seconds of the agent side (this process,
all threads) and of the store process.

    .venv/bin/python -m tests.bench.upload                 # 256 MiB, 5 repeats
    .venv/bin/python -m tests.bench.upload --mib 64 --repeats 3 --chunk-kib 128
    .venv/bin/python -m tests.bench.upload --plaintext    # gRPC without TLS, to compare
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import agent.recorder.uplink.client as uplink_module
from agent.capture import (
    utc_now,
)
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.recorder.uplink.client import Uplink
from agent.recorder.uplink.outbox import Outbox, OutboxEntry
from agent.store.archive import crypto
from tests.bench.common import TICK, emit, median, sample
from tests.support.calls import call_meta
from tests.support.calls import outbox_entry as outbox_entry_of
from tests.support.daemons import Daemon, start_store
from tests.support.pki import SITE, make_pki
from tests.support.stack import Keys, agent_config, make_keys

MODULE = "tests.bench.upload"
MIB = 1024 * 1024
TCP_CHUNK = 256 * 1024


# ---------------------------------------------------------------- the payload


def write_payload(path: Path, mib: int) -> str:
    """``mib`` MiB of random bytes; returns their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(mib):
            block = os.urandom(MIB)
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def outbox_entry(outbox_dir: Path, keys: Keys, payload: Path, sha256: str) -> str:
    """An outbox entry exactly as finalize writes it; the audio is a hard link to the
    payload (the uplink removes the entry, the payload stays for the next repeat)."""
    end = utc_now()
    meta = call_meta(keys, end - dt.timedelta(hours=1), end)
    size = payload.stat().st_size
    return outbox_entry_of(outbox_dir, meta, size, sha256, lambda path: os.link(payload, path))


# ---------------------------------------------------------------- gRPC path


@dataclasses.dataclass
class Phases:
    """When the uplink's request stream handed gRPC its finish message."""

    finish_pulled: float = 0.0


def timed_requests(phases: Phases) -> object:
    original = uplink_module.upload_requests

    def requests(entry: OutboxEntry, offset: int, chunk_bytes: int) -> Iterator[pb.UploadRequest]:
        for request in original(entry, offset, chunk_bytes):
            if request.WhichOneof("kind") == "finish":
                phases.finish_pulled = time.perf_counter()
            yield request

    return requests


FIELD = re.compile(r"\b(receive_s|verify_s|seal_s)=([\d.]+)")


def store_figures(store: Daemon, rid: str) -> dict[str, float]:
    """The store's receive and finish seconds (finish: sha256 check + seal + row)."""
    for line in store.text().splitlines():
        if f"event=recording_stored recording_id={rid}" in line:
            found = {k: float(v) for k, v in FIELD.findall(line)}
            if "receive_s" not in found:
                return {}
            finish = found.get("verify_s", 0.0) + found.get("seal_s", 0.0)
            return {"store_receive_s": found["receive_s"], "store_finish_s": finish}
    return {}


def cpu_s(pid: int) -> float:
    found = sample(pid)
    return found.cpu_ticks / TICK if found else 0.0


def grpc_once(
    uplink: Uplink, outbox: Outbox, rid: str, size: int, store: Daemon
) -> dict[str, float]:
    assert store.process is not None
    phases = Phases()
    uplink_module.upload_requests = timed_requests(phases)  # type: ignore[assignment]
    self0, store0 = os.times(), cpu_s(store.process.pid)
    start = time.perf_counter()
    uplink.handle(rid)
    end = time.perf_counter()
    self1, store1 = os.times(), cpu_s(store.process.pid)
    if rid in outbox.entries():
        raise SystemExit(f"upload of {rid} did not reach the store's receipt")
    figures = {
        "seconds": end - start,
        "mb_s": size / 1e6 / (end - start),
        "stream_s": phases.finish_pulled - start,
        "finish_s": end - phases.finish_pulled,
        "agent_cpu_s": (self1.user + self1.system) - (self0.user + self0.system),
        "store_cpu_s": store1 - store0,
    }
    deadline = time.monotonic() + 5
    while not (found := store_figures(store, rid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the store's log line may trail its receipt by a moment
    return figures | found


# ---------------------------------------------------------------- plain TCP path


def receiver(directory: Path) -> None:
    """A receiver process: per connection, an 8-byte size, the bytes into a file,
    fsync, then one byte back ("durable")."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    buffer = bytearray(TCP_CHUNK)
    view = memoryview(buffer)
    while True:
        conn, _ = listener.accept()
        with conn:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                return
            (left,) = struct.unpack(">Q", head)
            target = directory / "received.bin"
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                while left:
                    n = conn.recv_into(view, min(left, TCP_CHUNK))
                    if not n:
                        raise SystemExit("sender went away")
                    os.write(fd, view[:n])
                    left -= n
                os.fsync(fd)
            finally:
                os.close(fd)
            conn.sendall(b"\x01")
            target.unlink()


def tcp_once(port: int, payload: Path, size: int) -> dict[str, float]:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn, payload.open("rb") as fh:
        conn.sendall(struct.pack(">Q", size))
        while data := fh.read(TCP_CHUNK):
            conn.sendall(data)
        if conn.recv(1) != b"\x01":
            raise SystemExit("plain TCP receiver did not confirm")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mb_s": size / 1e6 / seconds}


# ---------------------------------------------------------------- store-side pieces alone


def pieces_alone(payload: Path, work: Path, size: int, chunk: int) -> dict[str, float]:
    """The store's finish work on this payload, timed alone in this process: sha256
    over the file, and AES-GCM encryption into a new file + fsync."""
    start = time.perf_counter()
    with payload.open("rb") as fh:
        hashlib.file_digest(fh, "sha256")
    sha_s = time.perf_counter() - start
    sealed = work / "sealed.bin"
    start = time.perf_counter()
    with payload.open("rb") as src, sealed.open("wb") as out:
        crypto.encrypt_stream(crypto.new_data_key(), "0" * 32, src, size, out, chunk)
        out.flush()
        os.fsync(out.fileno())
    seal_s = time.perf_counter() - start
    sealed.unlink()
    return {
        "sha256_mb_s": size / 1e6 / sha_s,
        "encrypt_fsync_mb_s": size / 1e6 / seal_s,
    }


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, root: Path) -> tuple[dict[str, object], list[list[object]]]:
    keys = make_keys(root / "keys")
    made = make_pki(root / "tls")
    store_tls, agent_tls = made.store_tls, made.agent_uplink
    if args.plaintext:  # for comparison only: production is mutual TLS
        store_tls, agent_tls = {"insecure": True}, {"insecure": True}
    payload = root / "payload.bin"
    sha256 = write_payload(payload, args.mib)
    size = payload.stat().st_size
    recv_dir = root / "tcp"
    recv_dir.mkdir()
    tcp = subprocess.Popen(
        [sys.executable, "-m", MODULE, "--tcp-receiver", str(recv_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    store, address = start_store(root, tls=store_tls)
    try:
        assert tcp.stdout is not None
        port = int(tcp.stdout.readline())
        uplink_cfg = {**agent_tls, "chunk_bytes": args.chunk_kib * 1024}
        cfg, _ = agent_config(root, keys, address, uplink=uplink_cfg)
        outbox = Outbox(cfg.outbox_dir)
        uplink = Uplink(cfg.uplink, outbox, cfg.quarantine_dir, site=SITE)
        try:
            # Warm-up: the TLS handshake and the first connection are not throughput.
            warm = root / "warm.bin"
            warm_sha = write_payload(warm, 1)
            uplink.handle(outbox_entry(cfg.outbox_dir, keys, warm, warm_sha))
            tcp_once(port, warm, warm.stat().st_size)
            rows: list[list[object]] = []
            for i in range(args.repeats):
                order = ("grpc", "tcp") if i % 2 == 0 else ("tcp", "grpc")
                got: dict[str, dict[str, float]] = {}
                for path in order:
                    if path == "grpc":
                        rid = outbox_entry(cfg.outbox_dir, keys, payload, sha256)
                        got[path] = grpc_once(uplink, outbox, rid, size, store)
                    else:
                        got[path] = tcp_once(port, payload, size)
                g, t = got["grpc"], got["tcp"]
                rows.append(
                    [
                        i + 1,
                        g["mb_s"],
                        t["mb_s"],
                        g["mb_s"] / t["mb_s"],
                        g["stream_s"],
                        g["finish_s"],
                        g.get("store_receive_s", float("nan")),
                        g.get("store_finish_s", float("nan")),
                        g["agent_cpu_s"],
                        g["store_cpu_s"],
                    ]
                )
                print(f"repeat {i + 1}: grpc {g['mb_s']:.1f} MB/s, tcp {t['mb_s']:.1f} MB/s")
        finally:
            uplink.close()
        alone = pieces_alone(payload, root, size, crypto.DEFAULT_CHUNK)
    finally:
        store.stop()
        tcp.kill()
        tcp.wait(10)
    return {"size": size, "rows": rows, "alone": alone}, rows


COLUMNS = [
    "repeat",
    "grpc_MB/s",
    "tcp_MB/s",
    "grpc/tcp",
    "stream_s",
    "finish_s",
    "store_recv_s",
    "store_finish_s",
    "agent_cpu_s",
    "store_cpu_s",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=256, help="recording size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chunk-kib", type=int, default=None, help="[uplink] chunk_bytes (default: config's)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="work directory (ext4, not tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--plaintext", action="store_true", help="gRPC without TLS (to see what TLS costs)"
    )
    parser.add_argument("--tcp-receiver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tcp_receiver is not None:
        receiver(args.tcp_receiver)
        return
    if args.chunk_kib is None:
        from agent.config import UplinkConfig

        args.chunk_kib = UplinkConfig().chunk_bytes // 1024
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-upload-", dir=args.dir))
    try:
        result, rows = run(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    cols = list(zip(*rows, strict=True))
    medians = [median([float(v) for v in col]) for col in cols[1:]]
    summary = dict(zip(COLUMNS[1:], medians, strict=True))
    alone = result["alone"]
    assert isinstance(alone, dict)
    emit(
        "upload",
        MODULE,
        {
            f"{args.mib} MiB, chunk {args.chunk_kib} KiB, "
            f"{'plain text' if args.plaintext else 'mTLS'}, {args.repeats} repeats": (
                COLUMNS,
                rows,
            ),
            "medians": (COLUMNS, [["median", *medians]]),
            "store-side work alone on the same bytes (this process)": (
                ["sha256_MB/s", "encrypt+fsync_MB/s"],
                [[alone["sha256_mb_s"], alone["encrypt_fsync_mb_s"]]],
            ),
        },
        {
            "size_bytes": result["size"],
            "chunk_bytes": args.chunk_kib * 1024,
            "tls": not args.plaintext,
            "repeats": args.repeats,
            "median": summary,
            "alone": alone,
        },
        started=started,
    )


if __name__ == "__main__":
    main()
