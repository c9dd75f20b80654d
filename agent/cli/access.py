"""``callrec`` subcommands of people's access (issue 8). Wired into ``agent/cli/main.py``
by ``add_parsers(sub)`` and ``dispatch(args)`` (None: not one of these).

On the store host (reads ``store.toml``):
  callrec access token create --config store.toml --person e1001 [--expires 90d]  shown once
  callrec access token list --config store.toml [--person ID]      created, expires, last used
  callrec access token revoke --config store.toml (--token-id ID | --person ID)
  callrec audit verify --config store.toml                         names the first bad entry

From anywhere (token from ``$CALLREC_TOKEN`` or ``--token-file``; ``--store ADDR``;
``--ca-file/--cert-file/--key-file`` for mutual TLS, plain text only to loopback):
  callrec search --purpose P [--since T --until T --employee ID --team T --service N
                 --masked +358401234*** --flag F … --limit N]
  callrec show ID --purpose P
  callrec play ID --purpose P [--out FILE]        (no --out: audio to a pipe, never a terminal)
  callrec export ID --purpose P --out FILE
  callrec audit log [--recording ID] [--person ID] …  who did what (agent.client.audit)
  callrec dsr …                                   the privacy officer's tasks (agent.client.dsr)
Listings take ``--json`` or ``--csv``. What is not given on the command line comes from
the profile (``~/.config/callrec/client.toml``, agent.client.profile).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agent.cli import localtime, tabular
from agent.cli.tabular import total_of
from agent.client import audit as audit_cli
from agent.client import dsr as dsr_cli
from agent.client.options import (
    FLAG_NAMES,
    VIEW_FIELDS,
    UsageError,
    add_client_options,
    apply_profile,
    channel,
    common,
    metadata,
    view_row,
)
from agent.config import ConfigError, load_store_config, parse_duration
from agent.directory import Directory
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.store.access import tokens
from agent.store.audit import chain as audit
from agent.store.catalog import Catalog

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

COMMANDS = frozenset({"access", "audit", "search", "show", "play", "export", "dsr"})
TOKEN_FIELDS = ("token_id", "person_id", "created_at", "expires_at", "last_used_at", "state")


# ---------------------------------------------------------------- parsers


def _with_id(sub: SubParsers, name: str, text: str, purpose: str | None = None) -> Any:
    parser = sub.add_parser(name, help=text)
    parser.add_argument("recording_id", help="as `callrec search` shows it")
    add_client_options(parser, purpose)
    return parser


def add_parsers(sub: SubParsers) -> None:
    access = sub.add_parser("access", help="people's access tokens (on the store host)")
    token = access.add_subparsers(dest="access_command", required=True)
    tsub = token.add_parser("token", help="create or revoke a person's token")
    tokens_sub = tsub.add_subparsers(dest="token_command", required=True)
    create = tokens_sub.add_parser("create", help="a new token for a person (shown once)")
    create.add_argument("--config", type=Path, required=True, help="the store's config")
    create.add_argument("--person", required=True, help="directory id")
    create.add_argument(
        "--expires", default=f"{tokens.DEFAULT_LIFETIME_DAYS}d", help="lifetime, e.g. 90d or 12w"
    )
    listing = tokens_sub.add_parser("list", help="tokens with their expiry and last use")
    listing.add_argument("--config", type=Path, required=True, help="the store's config")
    listing.add_argument("--person", help="only this person's")
    tabular.add_output_options(listing)
    revoke = tokens_sub.add_parser("revoke", help="revoke a token, or all of a person's")
    revoke.add_argument("--config", type=Path, required=True, help="the store's config")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--token-id", help="the token id `create` printed")
    which.add_argument("--person", help="directory id: all of this person's tokens")

    audit_parser = sub.add_parser("audit", help="the audit log")
    audit_sub = audit_parser.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain (on the store host)")
    verify.add_argument("--config", type=Path, required=True, help="the store's config")
    audit_cli.add_parser(audit_sub)

    search = sub.add_parser("search", help="recordings you may see")
    add_client_options(search)
    tabular.add_output_options(search)
    search.add_argument(
        "--since", help="ISO time, local unless an offset is given (e.g. 2026-03-02T14:30)"
    )
    search.add_argument("--until", help="ISO time, like --since")
    search.add_argument("--employee", default="", help="employee's directory id")
    search.add_argument("--team", default="", help="team name as in the directory")
    search.add_argument("--service", default="", help="service number, E.164")
    search.add_argument("--masked", default="", help="e.g. +358401234***")
    search.add_argument(
        "--flag",
        action="append",
        default=[],
        choices=FLAG_NAMES,
        metavar="FLAG",
        help="a recording flag (repeat): " + ", ".join(FLAG_NAMES),
    )
    search.add_argument("--limit", type=int, default=100, help="at most (default %(default)s)")

    tabular.add_output_options(_with_id(sub, "show", "a recording's metadata"))
    _with_id(sub, "play", "stream a recording's audio").add_argument(
        "--out", type=Path, help="write the audio here instead of playing it"
    )
    _with_id(sub, "export", "save a recording's audio").add_argument(
        "--out", type=Path, required=True, help="the audio file to write"
    )
    dsr_cli.add_parsers(sub, _with_id)


# ---------------------------------------------------------------- dispatch


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command in dsr_cli.OLD_SPELLINGS:
        dsr_cli.old_spelling(args)
    elif args.command not in COMMANDS:
        return None
    try:
        return _run(args)
    except grpc.RpcError as exc:
        sys.stderr.write(f"callrec {args.command}: {exc.code().name}: {exc.details()}\n")
        return 1
    except UsageError as exc:
        sys.stderr.write(f"callrec {args.command}: {exc}\n")
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "access":
        return token_command(args)
    if args.command == "audit" and args.audit_command == "verify":
        return audit_verify(args.config)
    apply_profile(args)
    if args.command == "play" and args.out is None and sys.stdout.isatty():
        raise UsageError(
            "refusing to write audio to a terminal: give --out FILE, pipe it to a player "
            "(| mpv -), or listen in the web player"
        )
    stub = apb_grpc.AccessStub(channel(args))
    handlers: dict[str, Callable[[apb_grpc.AccessStub, argparse.Namespace, Any], int]] = {
        "search": _search,
        "show": _show,
        "play": _audio,
        "export": _audio,
        "dsr": _dsr,
        "audit": lambda stub, args, md: audit_cli.show_log(stub, args, md, _ts),
    }
    return handlers[args.command](stub, args, metadata(args))


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


# ---------------------------------------------------------------- store-host commands


def _open_catalog(config: Path) -> tuple[Catalog, Directory | None]:
    cfg = load_store_config(config)
    catalog = Catalog(cfg.catalog_url)
    directory = Directory.load(cfg.directory_file) if cfg.directory_file else None
    return catalog, directory


def token_command(args: argparse.Namespace) -> int:
    catalog, directory = _open_catalog(args.config)
    operator = f"operator:{getpass.getuser()}"
    try:
        catalog.migrate()
        if args.token_command == "list":  # noqa: S105 (a subcommand, not a secret)
            return _list_tokens(catalog, args.person, args.output)
        if args.token_command == "create":  # noqa: S105 (a subcommand, not a secret)
            if directory is None:
                raise ConfigError("[store] directory_file: missing, needed for access tokens")
            person = directory.people.get(args.person)
            if person is None:
                raise UsageError(f"--person {args.person}: not in {directory_name(args.config)}")
            try:
                days = tokens.parse_lifetime(args.expires)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            with catalog.engine.begin() as conn:
                new = tokens.create_token(conn, person.id, operator, days)
                detail = f"person={person.id} token_id={new.token_id} days={days}"
                audit.append(conn, operator, "token_create", None, "", "allowed", detail=detail)
            _out(f"token for {person.id} ({person.name}), id {new.token_id} — shown once:")
            _out(new.token)
            return 0
        with catalog.engine.begin() as conn:
            count = tokens.revoke(conn, args.token_id, args.person)
            detail = f"token_id={args.token_id or '*'} person={args.person or '-'} count={count}"
            audit.append(conn, operator, "token_revoke", None, "", "allowed", detail=detail)
        _out(f"revoked {count} token(s)")
        return 0 if count else 1
    finally:
        catalog.close()


def _list_tokens(catalog: Catalog, person_id: str | None, output: str) -> int:
    with catalog.engine.connect() as conn:
        found = tokens.list_tokens(conn, person_id)
    now_ms = dt.datetime.now(dt.UTC).timestamp() * 1000
    rows: list[dict[str, object]] = []
    w = len(localtime.show(dt.datetime.now(dt.UTC), seconds=False)) + 1
    lines = [
        f"token_id          person     {'created':<{w}} {'expires':<{w}} {'last_used':<{w}} state"
    ]
    for row in found:
        state = (
            "revoked"
            if row.revoked_at_ms is not None
            else "expired"
            if row.expires_at_ms is not None and row.expires_at_ms <= now_ms
            else "live"
        )
        rows.append({
            "token_id": row.token_id, "person_id": row.person_id,
            "created_at": _iso(row.created_at_ms), "expires_at": _iso(row.expires_at_ms),
            "last_used_at": _iso(row.last_used_at_ms), "state": state,
        })  # fmt: skip
        lines.append(
            f"{row.token_id}  {row.person_id:<9.9}  {_when(row.created_at_ms):<{w}} "
            f"{_when(row.expires_at_ms) if row.expires_at_ms is not None else 'never':<{w}} "
            f"{_when(row.last_used_at_ms) if row.last_used_at_ms else 'never':<{w}} {state}"
        )
    tabular.emit(output, TOKEN_FIELDS, rows, lines)
    return 0


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return localtime.show(dt.datetime.fromtimestamp(ms / 1000, dt.UTC), seconds=False)


def directory_name(config: Path) -> str:
    cfg = load_store_config(config)
    return str(cfg.directory_file)


def audit_verify(config: Path) -> int:
    cfg = load_store_config(config)
    catalog = Catalog(cfg.catalog_url)
    try:
        verdict = audit.verify(catalog)
    finally:
        catalog.close()
    if verdict.ok:
        _out(f"audit log ok: {verdict.entries} entries, head {verdict.head_hash}")
        return 0
    _out(f"audit log BROKEN after {verdict.entries} good entries: {verdict.problem}")
    return 1


# ---------------------------------------------------------------- client commands


def parse_time(text: str) -> dt.datetime:
    """An ISO time; without an offset, the local time (``TZ`` or the system's zone)."""
    try:
        return localtime.parse(text)
    except ValueError:
        raise UsageError(f"{text!r}: expected an ISO time such as 2026-03-02T14:30") from None


def _ts(text: str | None) -> Timestamp | None:
    if not text:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(parse_time(text).astimezone(dt.UTC))
    return stamp


def format_view(view: apb.RecordingView) -> str:
    m, info = view.info.manifest, view.info
    start = localtime.show(m.started_at.ToDatetime(dt.UTC))
    marks = [
        name for name, on in (("RESTRICTED", view.restricted), ("HOLD", view.legal_hold)) if on
    ]
    return (
        f"{m.recording_id}  {start}  {info.duration_ms / 1000:6.1f}s  "
        f"service={m.service_number or '-'}  customer={m.customer.masked}  "
        f"employees={','.join(e.id for e in m.employees) or '-'}  "
        f"{m.audio_format}  flags={','.join(m.flags) or '-'}"
        + (f"  [{' '.join(marks)}]" if marks else "")
    )


def _search(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    request = apb.SearchRequest(
        **common(args),
        since=_ts(args.since),
        until=_ts(args.until),
        employee_id=args.employee,
        team=args.team,
        service_number=args.service,
        customer_masked=args.masked,
        flags=args.flag,
        limit=args.limit,
    )
    response = stub.Search(request, metadata=md, timeout=60)
    _views(args.output, response.recordings)
    if response.truncated:
        tabular.note(args.output, "… more recordings match: narrow the search or raise --limit")
    return 0


def _views(output: str, views: Iterable[apb.RecordingView]) -> None:
    listed = list(views)
    rows = [view_row(view) for view in listed]
    tabular.emit(output, VIEW_FIELDS, rows, [format_view(view) for view in listed])


def _show(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    request = apb.RecordingRequest(**common(args), recording_id=args.recording_id)
    view = stub.GetRecording(request, metadata=md, timeout=30)
    if args.output != "text":
        _views(args.output, [view])
        return 0
    _out(format_view(view))
    for line in format_pauses(view.info.manifest):
        _out(line)
    return 0


def format_pauses(m: pb.Manifest) -> list[str]:
    """``paused 10.0-20.0 s (api:crm)``: offsets from the call's start, who asked."""
    start = m.started_at.ToMilliseconds()
    return [
        f"  paused {(p.start.ToMilliseconds() - start) / 1000:.1f}-"
        f"{(p.end.ToMilliseconds() - start) / 1000:.1f} s ({p.who})"
        for p in m.pauses
    ]


def _save(chunks: Iterable[bytes], out: Path | None) -> int:
    if out is None:
        size = 0
        for data in chunks:
            sys.stdout.buffer.write(data)
            size += len(data)
        sys.stdout.buffer.flush()
        return size
    part = out.with_name(out.name + ".part")
    size = 0
    with part.open("wb") as fh:
        for data in chunks:
            fh.write(data)
            size += len(data)
    part.replace(out)
    return size


def _audio(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    request = apb.RecordingRequest(**common(args), recording_id=args.recording_id)
    call = stub.Play if args.command == "play" else stub.Export
    stream = call(request, metadata=md, timeout=600)
    data: Iterable[bytes] = (c.data for c in stream)
    if args.out is not None:  # a progress line on a terminal; none into a player's pipe
        progress = tabular.Progress(f"{args.command} {args.recording_id}", total_of(stream))
        data = tabular.counted(data, progress, len)
    size = _save(data, args.out)
    if args.out is not None:
        _out(f"{args.command}: {args.recording_id} → {args.out} ({size} bytes)")
    return 0


def _dsr(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    handlers = {"find": _find, "export": _package, "rectify": _rectify, "unseal": _unseal}
    return handlers.get(args.dsr_command, _change)(stub, args, md)


def _find(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    if args.number is not None:
        raise UsageError(
            "--number is refused: a number on the command line shows in the process "
            "list and the shell history; give it on stdin or at the prompt"
        )
    number = _read_number()
    try:
        window_min = round(parse_duration(args.window) / 60)
    except ValueError:
        raise UsageError(f"--window {args.window!r}: expected e.g. 15m") from None
    request = apb.FindByNumberRequest(
        **common(args), number=number, region=args.region, at=_ts(args.at),
        window_minutes=window_min,
    )  # fmt: skip
    response = stub.FindByNumber(request, metadata=md, timeout=60)
    _views(args.output, response.recordings)
    tabular.note(args.output, f"{len(response.recordings)} recording(s) within ±{window_min} min")
    return 0


def _read_number() -> str:
    """The customer's number from the terminal (not echoed) or one line of stdin."""
    if sys.stdin.isatty():
        number = getpass.getpass("customer's number (not shown): ")
    else:
        number = sys.stdin.readline(200)
    if not number.strip():
        raise UsageError("no number: give it on stdin or at the prompt")
    return number.strip()


def _package(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    request = apb.PackageRequest(**common(args), recording_ids=args.recording_ids)
    part = args.out.with_name(args.out.name + ".part")
    files = 0
    stream = stub.ExportPackage(request, metadata=md, timeout=600)
    progress = tabular.Progress(f"dsr export → {args.out}", total_of(stream))
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED) as package:
        current: tuple[str, Any] | None = None
        for chunk in tabular.counted(stream, progress, lambda c: len(c.file.data)):
            if chunk.WhichOneof("kind") == "metadata_json":
                package.writestr("metadata.json", chunk.metadata_json)
                continue
            if current is None or current[0] != chunk.file.name:
                if current is not None:
                    current[1].close()
                current = (chunk.file.name, package.open(chunk.file.name, "w"))
                files += 1
            current[1].write(chunk.file.data)
        if current is not None:
            current[1].close()
    part.replace(args.out)
    _out(f"package: {files} recording(s) + metadata.json → {args.out}")
    return 0


def _change(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    name = args.dsr_command
    calls = {
        "erase": stub.Erase,
        "restrict": stub.Restrict,
        "unrestrict": stub.Unrestrict,
        "hold": stub.Hold,
        "release": stub.Release,
    }
    request = apb.RecordingRequest(**common(args), recording_id=args.recording_id)
    result = calls[name](request, metadata=md, timeout=60)
    if name == "erase" and not result.changed:
        _out(f"erase: {result.recording_id} key shredded; the sweeper removes the rest")
    else:
        _out(f"{name}: {result.recording_id} {'done' if result.changed else 'already so'}")
    return 0


def _rectify(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    request = apb.RectifyRequest(
        **common(args), recording_id=args.recording_id, from_employee_id=args.wrong,
        to_employee_id=args.to,
    )  # fmt: skip
    result = stub.RectifyEmployee(request, metadata=md, timeout=60)
    _out(f"rectify: {result.recording_id} {'done' if result.changed else 'already so'}")
    return 0


def _unseal(stub: apb_grpc.AccessStub, args: argparse.Namespace, md: Any) -> int:
    request = apb.RecordingRequest(**common(args), recording_id=args.recording_id)
    sealed = stub.OpenSealedDigits(request, metadata=md, timeout=30)
    _out(
        f"{sealed.recording_id}  masked={sealed.customer_masked}  last_digits={sealed.last_digits}"
    )
    return 0
