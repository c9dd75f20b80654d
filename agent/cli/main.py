"""``callrec``: the operator's single entry point.

callrec agent  --config agent.toml      the recording agent beside the PBX
callrec store  --config store.toml      the central store
callrec keys init|master|seal …         seal key pair; master key rotate/rewrap/retire
callrec list   --store-dir DIR          list stored recordings (operator console)
callrec export ID --out FILE --reason R export one recording's audio
callrec check  --agent/--store FILE     validate a config and its key files
callrec config keys [KIND]              every config key: default and meaning
callrec demo                            store + agent + a real SIPREC call (source checkout only)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agent import certs, logs
from agent.cli import access, keys, localtime, tabular
from agent.config import (
    ConfigError,
    StoreConfig,
    check_transport,
    load_agent_config,
    load_store_config,
    reference,
)
from agent.directory import Directory, DirectoryError
from agent.manifest import DIRECTION_NAMES, RECORDING_FIELDS, recording_fields
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.pb.callrec.v1 import recordings_pb2_grpc as pb_grpc
from agent.privacy import KeyFileError, Sealer, check_private_file
from agent.recorder import quarantine
from agent.recorder.control import cli as control_cli
from agent.recorder.control.tokens import Tokens as ControlTokens
from agent.recorder.front import logfilter as frontlog
from agent.store.keys.master import FileKeyWrapper
from agent.store.keys.numbers import SealKeyring
from agent.web import cli as web_cli

log = logs.get_logger("callrec")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callrec", description="call-recording register")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the recording agent")
    agent.add_argument("--config", type=Path, required=True, help="agent.toml")

    # Started by the agent, never by hand: no help=, so it is left out of `callrec --help`.
    worker = sub.add_parser("worker", description="one SIP recorder process")
    worker.add_argument("--config", type=Path, required=True, help="the agent's config")
    worker.add_argument("--index", type=int, default=0, help="the worker's slot")
    worker.add_argument("--ready-fd", type=int, default=None, help="pipe to say ready on")

    store = sub.add_parser("store", help="run the central store")
    store.add_argument("--config", type=Path, required=True, help="store.toml")

    sweep = sub.add_parser("sweep", help="destroy recordings past their retention")
    sweep.add_argument("--config", type=Path, required=True, help="store.toml")
    sweep.add_argument("--once", action="store_true", help="one pass, for a systemd timer")
    sweep.add_argument(
        "--timer",
        action="store_true",
        help='run by callrec-sweep.timer: sweep only when [store] sweep_by = "timer"',
    )

    keys.add_parsers(sub)
    listing = sub.add_parser(
        "console-list", help="list recordings (operator console on the store host)"
    )
    listing.add_argument("--store-dir", type=Path, required=True, help="[store] data_dir")
    listing.add_argument("--limit", type=int, default=20, help="at most (default %(default)s)")
    tabular.add_output_options(listing)

    export = sub.add_parser(
        "console-export", help="export a recording's audio (operator console on the store host)"
    )
    export.add_argument("recording_id", help="as console-list shows it")
    export.add_argument("--store-dir", type=Path, required=True, help="[store] data_dir")
    export.add_argument("--out", type=Path, required=True, help="the audio file to write")
    export.add_argument("--reason", required=True, help="why (written to the store's log)")
    export.add_argument(
        "--purpose",
        required=True,
        choices=("verification", "legal", "training", "security"),
        help="the notice's purpose this export serves (audited)",
    )

    check = sub.add_parser("check", help="validate a config file and the files it names")
    group = check.add_mutually_exclusive_group(required=True)
    group.add_argument("--agent", type=Path, help="an agent's config")
    group.add_argument("--store", type=Path, help="a store's config")

    if demo_installed():
        demo = sub.add_parser("demo", help="run store + agent and place a real SIPREC call")
        demo.add_argument("--dir", type=Path, default=Path("demo-data"), help="data (%(default)s)")
        demo.add_argument("--seconds", type=float, default=6.0, help="call length (%(default)s)")
        demo.add_argument(
            "--web", action="store_true", help="then serve the people's web until Ctrl-C"
        )
    access.add_parsers(sub)
    certs.add_parsers(sub)
    reference.add_parsers(sub)
    frontlog.add_parsers(sub)
    quarantine.add_parsers(sub)
    control_cli.add_parsers(sub)
    web_cli.add_parsers(sub)
    return parser


def demo_installed() -> bool:
    """The demo and its test-call harness (SIPp scenarios, speech), both in
    ``agent.testcall``, ship with a source checkout, not with the Debian package: a
    production host has no ``demo`` command. Found without importing it."""
    return importlib.util.find_spec("agent.testcall") is not None


def require_sip_library() -> None:
    """The agent's workers need pjsua2; say so in one line rather than let each worker
    die on import (pjsua2-python has no wheel for Python 3.13)."""
    if importlib.util.find_spec("pjsua2") is None:
        raise ConfigError(
            f"pjsua2 is not installed for Python {sys.version_info.major}."
            f"{sys.version_info.minor}: the SIP workers need pjsua2-python "
            "(wheels for Python 3.8 to 3.12)"
        )


def installed_version() -> str:
    """The version of the installed distribution (its metadata, as pip or the .deb put it)."""
    try:
        return importlib.metadata.version("callrec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a distribution)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, KeyFileError, DirectoryError, ConsoleError) as exc:
        sys.stderr.write(f"callrec {args.command}: {exc}\n")
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a file the operator named: a real fault
            raise
        sys.stderr.write(f"callrec {args.command}: {_file_problem(exc)}\n")
        return 2
    except KeyboardInterrupt:
        return 130


class ConsoleError(Exception):
    """The store's console socket is not there to talk to; exit code 2."""


def _file_problem(exc: OSError) -> str:
    """One line for a file that can't be used: which, why, what to do."""
    what = {
        IsADirectoryError: "is a directory; give the file's path",
        FileNotFoundError: "not found; check the path",
        PermissionError: "permission denied; check the file's owner and mode "
        "(the service user must be able to read it)",
    }
    for kind, text in what.items():
        if isinstance(exc, kind):
            return f"{exc.filename}: {text}"
    return f"{exc.filename}: {exc.strerror or exc}"


def _dispatch(args: argparse.Namespace) -> int:
    dispatchers: tuple[Callable[[argparse.Namespace], int | None], ...] = (
        access.dispatch,
        certs.dispatch,
        reference.dispatch,
        frontlog.dispatch,
        keys.dispatch,
        quarantine.dispatch,
        control_cli.dispatch,
        web_cli.dispatch,
    )
    for dispatch in dispatchers:
        handled = dispatch(args)
        if handled is not None:
            return handled
    if args.command == "agent":
        agent_cfg = load_agent_config(args.config)
        require_sip_library()
        logs.configure(agent_cfg.log_level, identifier="callrec-agent")
        from agent.recorder.daemon import run_agent

        return run_agent(agent_cfg, args.config)
    if args.command == "worker":
        agent_cfg = load_agent_config(args.config)
        logs.configure(agent_cfg.log_level, identifier="callrec-agent")
        from agent.recorder.worker import worker_main

        return worker_main(agent_cfg, args.index, args.ready_fd, args.config)
    if args.command == "store":
        store_cfg = load_store_config(args.config)
        logs.configure(store_cfg.log_level, identifier="callrec-store")
        from agent.store.server import serve

        return asyncio.run(serve(store_cfg))
    if args.command == "sweep":
        store_cfg = load_store_config(args.config)
        logs.configure(store_cfg.log_level, identifier="callrec-sweep")
        from agent.store.retention.sweeper import run_sweeper

        return run_sweeper(store_cfg, once=args.once, timer=args.timer)
    if args.command == "console-list":
        return list_recordings(args.store_dir, args.limit, args.output)
    if args.command == "console-export":
        return export_audio(args.store_dir, args.recording_id, args.out, args.reason, args.purpose)
    if args.command == "check":
        return check_config(args.agent, args.store)
    if args.command == "demo":
        logs.configure("info")
        from agent.testcall.demo import run_demo

        return run_demo(args.dir, args.seconds, args.web)
    raise AssertionError(args.command)


def _console(store_dir: Path) -> pb_grpc.ConsoleStub:
    sock = store_dir / "console.sock"
    if not sock.is_socket():
        raise ConsoleError(
            f"{sock}: no console socket; is `callrec store` running with "
            f"[store] data_dir = {store_dir} on this host?"
        )
    channel = grpc.insecure_channel(f"unix:{sock}")
    return pb_grpc.ConsoleStub(channel)


def list_recordings(store_dir: Path, limit: int, output: str = "text") -> int:
    response = _console(store_dir).ListRecordings(pb.ListRecordingsRequest(limit=limit), timeout=10)
    rows = [recording_fields(info, _utc_ms) for info in response.recordings]
    tabular.emit(output, RECORDING_FIELDS, rows, format_recordings(response.recordings))
    return 0


def _utc_ms(stamp: Timestamp) -> str:
    return stamp.ToDatetime(dt.UTC).isoformat(timespec="milliseconds")


def format_recordings(
    recordings: Iterable[pb.RecordingInfo], zone: dt.tzinfo | None = None
) -> list[str]:
    """One line a recording, its times in local time with the zone stated (``TZ``, else
    the system's), as the people's CLI shows them; ``--json``/``--csv`` keep UTC."""
    zone = zone or localtime.local_zone()
    lines = []
    for info in recordings:
        m = info.manifest
        employees = ", ".join(e.name for e in m.employees) or "unknown"
        lines.append(
            f"{m.recording_id}  {_span(m.started_at, m.ended_at, zone)}  "
            f"{info.duration_ms / 1000:6.1f}s  {DIRECTION_NAMES[m.direction]:8}  "
            f"service={m.service_number or '-'}  customer={m.customer.masked}  "
            f"employee={employees!r}  {m.audio_format}/{m.channels}ch  "
            f"flags={','.join(m.flags) or '-'}"
        )
    return lines


def _span(start: Timestamp, end: Timestamp, zone: dt.tzinfo) -> str:
    """``2026-07-01 12:15:30 +03:00 EEST → 12:16:00``: the end's date, offset and zone
    only when they differ from the start's (past midnight, over a clock change)."""
    began = localtime.show(start.ToDatetime(dt.UTC), zone)
    ended = localtime.show(end.ToDatetime(dt.UTC), zone)
    day, clock, *rest = ended.split(" ")
    same = [day, *rest] == [began.split(" ")[0], *began.split(" ")[2:]]
    return f"{began} → {clock if same else ended}"


def export_audio(store_dir: Path, recording_id: str, out: Path, reason: str, purpose: str) -> int:
    request = pb.ExportAudioRequest(recording_id=recording_id, reason=reason, purpose=purpose)
    stream = _console(store_dir).ExportAudio(request, timeout=60)
    progress = tabular.Progress(f"export {recording_id}", tabular.total_of(stream))
    tmp = out.with_name(out.name + ".part")
    size = 0
    with tmp.open("wb") as fh:
        for chunk in tabular.counted(stream, progress, lambda chunk: len(chunk.data)):
            fh.write(chunk.data)
            size += len(chunk.data)
    tmp.replace(out)
    sys.stdout.write(f"exported {recording_id} to {out} ({size} bytes)\n")
    return 0


Check = tuple[Callable[[Path], object], Path | None]  # None: not configured, skipped


def check_config(agent_path: Path | None, store_path: Path | None) -> int:
    """Validate a config and every file it names; one line per problem."""
    loaders: list[Check] = []
    tls = None
    if agent_path is not None:
        cfg = load_agent_config(agent_path)
        check_transport(cfg.uplink)
        tls = cfg.uplink.tls
        loaders += [
            (_obsolete("[privacy] lookup_key_file"), cfg.privacy.lookup_key_file),
            (Sealer.load, cfg.privacy.seal_public_key_file),
            (Directory.load, cfg.directory_file),
        ]
        if cfg.control is not None:
            loaders.append((ControlTokens.load, cfg.control.tokens_file))
    if store_path is not None:
        store_cfg = load_store_config(store_path)
        check_transport(store_cfg)
        tls = store_cfg.tls
        loaders += _store_checks(store_cfg)
    if tls is not None:
        loaders += [
            (certs.load_cert, tls.ca_file),
            (certs.load_cert, tls.cert_file),
            (check_private_file, tls.key_file),
        ]
    problems: list[str] = []
    for load, path in loaders:
        if path is None:
            continue
        try:
            load(path)
        except (KeyFileError, DirectoryError, ConfigError) as exc:
            problems.append(str(exc))
    for problem in problems:
        sys.stderr.write(problem + "\n")
    if not problems:
        sys.stdout.write("ok\n")
    return 1 if problems else 0


def _store_checks(cfg: StoreConfig) -> list[Check]:
    """The seal keyring (private, readable), the directory of people, the master key
    file when it exists (a new catalog's first start creates it), no lookup key."""
    checks: list[Check] = [
        (_obsolete("[store] lookup_key_file"), cfg.lookup_key_file),
        (SealKeyring.load, cfg.seal_key_file),
        (Directory.load, cfg.directory_file),
    ]
    if cfg.keys.wrapper == "pkcs11":
        checks.append((check_private_file, cfg.keys.pkcs11_pin_file))
    elif cfg.master_key_file.exists():
        checks.append((FileKeyWrapper.load, cfg.master_key_file))
    return checks


def _obsolete(key: str) -> Callable[[Path], object]:
    def refuse(path: Path) -> None:
        raise ConfigError(
            f"{key} = {str(path)!r}: obsolete, no lookup key is used any more; remove the "
            "setting and delete the file from this host (and its backups)"
        )

    return refuse


if __name__ == "__main__":
    raise SystemExit(main())
