"""``callrec audit log``: who did what, read through the store's Access service (the
privacy officer for a legal or security purpose, admins for security; the reading is
audited too). ``callrec audit verify`` (on the store host) is in ``agent.cli.access``.

    callrec audit log [--recording ID] [--person ID] [--since T] [--until T]
                      [--limit N] [--before SEQ] [--json | --csv]
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.cli import tabular
from agent.client.options import add_client_options, common
from agent.pb.callrec.v1 import access_pb2 as apb
from agent.pb.callrec.v1 import access_pb2_grpc as apb_grpc

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

FIELDS = (
    "seq", "at", "actor", "action", "recording_id", "purpose", "reason", "outcome", "detail",
)  # fmt: skip


def add_parser(audit_sub: SubParsers) -> None:
    log = audit_sub.add_parser(
        "log",
        help="who did what, newest first (privacy officer; admins for security)",
    )
    log.add_argument("--recording", default="", help="entries about this recording id")
    log.add_argument("--person", default="", help="entries by this directory id")
    log.add_argument("--since", help="ISO time (UTC unless an offset is given)")
    log.add_argument("--until", help="ISO time, like --since")
    log.add_argument("--limit", type=int, default=100, help="at most (1-1000, default 100)")
    log.add_argument("--before", type=int, default=0, help="older than this seq (paging)")
    add_client_options(log)
    tabular.add_output_options(log)


def show_log(
    stub: apb_grpc.AccessStub,
    args: argparse.Namespace,
    md: Any,
    timestamp: Callable[[str | None], Timestamp | None],
) -> int:
    request = apb.AuditRequest(
        **common(args), recording_id=args.recording, person_id=args.person,
        since=timestamp(args.since), until=timestamp(args.until), limit=args.limit,
        before_seq=args.before,
    )  # fmt: skip
    response = stub.AuditLog(request, metadata=md, timeout=60)
    rows = [_row(entry) for entry in response.entries]
    lines = [
        f"{r['seq']:>7}  {r['at']}  {r['actor']:<20}  {r['action']:<14}  "
        f"{r['recording_id'] or '-':<32}  {r['purpose'] or '-':<12}  {r['outcome']:<8}  "
        f"{r['reason'] or '-'}  {r['detail']}"
        for r in rows
    ]
    tabular.emit(args.output, FIELDS, rows, lines)
    if response.truncated and rows:
        tabular.note(args.output, f"… older entries: --before {rows[-1]['seq']}")
    return 0


def _row(entry: apb.AuditEntry) -> dict[str, object]:
    at = entry.at.ToDatetime(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "seq": entry.seq,
        "at": at,
        "actor": entry.actor,
        "action": entry.action,
        "recording_id": entry.recording_id,
        "purpose": entry.purpose,
        "reason": entry.reason,
        "outcome": entry.outcome,
        "detail": entry.detail,
    }
