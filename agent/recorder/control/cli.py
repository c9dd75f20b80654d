"""``callrec control``: the reference client of the agent's recording control API, for
an agent desktop, the ACD or the PBX's dialplan (README "Recording control")::

    callrec control pause   --extension 1001 [--url http://127.0.0.1:8470]
    callrec control resume  --call-id 'a84b4c76e66710@pbx'
    callrec control discard --extension 1001
    callrec control status  --extension 1001
    callrec control employee --recording-id ID --to-extension 1002
    callrec control token crm --tokens-file /etc/callrec/control.tokens

The token is read from ``--token-file`` or ``$CALLREC_CONTROL_TOKEN`` (never from the
command line, which other users can read in ``ps``). Exit status: 0 done, 1 no such
call or the call ended (404/409), 2 refused or unreachable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from agent.config import load_agent_config
from agent.recorder.control.tokens import new_token

OPS = ("pause", "resume", "discard", "status", "employee")
_SELECTORS = {
    "extension": "an employee's extension",
    "sip": "an employee's SIP identity",
    "call_id": "the PBX's Call-ID of the call (its recording session)",
    "person": "an employee's directory id",
    "recording_id": "the recording id",
}
TIMEOUT_S = 10.0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("control", help="pause, resume, discard a live call's recording")
    cs = c.add_subparsers(dest="control_command", required=True)
    for op in OPS:
        p = cs.add_parser(op, help=f"{op} the recording of the call selected")
        chosen = p.add_mutually_exclusive_group(required=True)
        for key, text in _SELECTORS.items():
            chosen.add_argument("--" + key.replace("_", "-"), dest=key, help=text)
        if op == "employee":
            to = p.add_mutually_exclusive_group(required=True)
            to.add_argument("--to-extension", help="bind the employee with this extension")
            to.add_argument("--to-person", help="bind the employee with this directory id")
        p.add_argument("--url", help="the API (default: [control] listen of --config)")
        p.add_argument("--config", type=Path, help="the agent's config, for the address")
        p.add_argument("--token-file", type=Path, help="file holding the token")
        p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
        p.add_argument("--key", type=Path, help="client key (mutual TLS)")
        p.add_argument("--ca", type=Path, help="the agent's CA (https)")
    token = cs.add_parser("token", help="make an integration's token (its hash goes to the file)")
    token.add_argument("name", help="the integration, e.g. crm (shown as who: api:crm)")
    token.add_argument("--tokens-file", type=Path, required=True, help="[control] tokens_file")


def dispatch(args: argparse.Namespace) -> int | None:
    if args.command != "control":
        return None
    if args.control_command == "token":
        sys.stdout.write(new_token(args.name, args.tokens_file) + "\n")
        return 0
    try:
        status, doc = _call(args)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"callrec control: {exc}\n")
        return 2
    if status != 200:
        sys.stderr.write(f"callrec control {args.control_command}: {status} {doc.get('error')}\n")
        return 1 if status in (404, 409) else 2
    for call in doc.get("calls") or [doc.get("call", {})]:
        sys.stdout.write(describe(call) + "\n")
    return 0


def describe(call: dict[str, Any]) -> str:
    pauses = call.get("pauses") or []
    employees = ",".join(e.get("id", "?") for e in call.get("employees") or []) or "-"
    return (
        f"{call.get('recording_id')} state={call.get('state')} "
        f"customer={call.get('customer', '-')} employees={employees} pauses={len(pauses)}"
    )


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        return Path(args.token_file).read_text().strip()
    return os.environ.get("CALLREC_CONTROL_TOKEN") or None


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    if args.config is not None:
        cfg = load_agent_config(args.config)
        if cfg.control is None:
            raise ValueError(f"{args.config}: no [control] section")
        scheme = "https" if cfg.control.tls is not None else "http"
        return f"{scheme}://{cfg.control.listen}"
    return "http://127.0.0.1:8470"


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    key = next(k for k in _SELECTORS if getattr(args, k) is not None)
    value, op = getattr(args, key), args.control_command
    if op == "status":
        return "GET", f"/calls?{key}={quote(value, safe='')}", None
    body: dict[str, Any] = {key: value}
    if op == "employee":
        who = {"extension": args.to_extension} if args.to_extension else {"person": args.to_person}
        body["employee"] = who
    return "POST", f"/calls/{op}", body


def _call(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    url = urlsplit(_base_url(args))
    method, path, body = _request(args)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    token = _token(args)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=args.ca)
        if args.cert is not None:
            context.load_cert_chain(args.cert, args.key)
        conn = http.client.HTTPSConnection(url.netloc, timeout=TIMEOUT_S, context=context)
    else:
        conn = http.client.HTTPConnection(url.netloc, timeout=TIMEOUT_S)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        doc = json.loads(response.read() or b"{}")
    finally:
        conn.close()
    if not isinstance(doc, dict):
        raise ValueError("the agent's answer is not a JSON object")
    return response.status, doc
