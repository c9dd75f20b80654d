"""What every people's command (``search``, ``play``, ``dsr …``) shares: its options,
the profile that fills in those not given, the channel and token, and how a recording
is shown (a line, or the stable fields of ``--json`` / ``--csv``)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agent.capture import Flag
from agent.client.profile import DEFAULT_STORE, PURPOSE_NAMES, ClientProfile, load_profile
from agent.config import is_loopback
from agent.manifest import RECORDING_FIELDS, recording_fields
from agent.pb.callrec.v1 import access_pb2 as apb

PURPOSES = {
    "verification": apb.PURPOSE_VERIFICATION,
    "legal": apb.PURPOSE_LEGAL,
    "training": apb.PURPOSE_TRAINING,
    "security": apb.PURPOSE_SECURITY,
}
assert set(PURPOSES) == set(PURPOSE_NAMES)
FLAG_NAMES = tuple(sorted(f.value for f in Flag))
TLS_OPTIONS = ("ca_file", "cert_file", "key_file")


class UsageError(Exception):
    """A client-side problem (no token, bad time); exit code 2."""


def add_client_options(parser: argparse.ArgumentParser, purpose: str | None = None) -> None:
    """``purpose``: the command's own default (data-subject commands: legal)."""
    parser.add_argument(
        "--store",
        help=f"the store's address (default: $CALLREC_STORE, the profile's, {DEFAULT_STORE})",
    )
    parser.add_argument("--token-file", type=Path, help="default: $CALLREC_TOKEN, the profile")
    for name in ("ca-file", "cert-file", "key-file"):
        parser.add_argument(
            f"--{name}", type=Path, help="TLS: --ca-file alone for the people's port"
        )
    default = f"default: {purpose}" if purpose else "default: the profile's purpose"
    parser.add_argument(
        "--purpose",
        choices=sorted(PURPOSES),
        help=f"why you need it (your access rules allow some purposes); audited ({default})",
    )
    parser.set_defaults(command_purpose=purpose)
    parser.add_argument("--reason", default="", help="why (a case id); audited")


def apply_profile(args: argparse.Namespace) -> None:
    """Fill in what the command line left out: from $CALLREC_STORE, $CALLREC_CA_FILE,
    $CALLREC_PURPOSE, then the profile (the TLS files as a group); settle the purpose."""
    profile = load_profile()
    args.store = args.store or os.environ.get("CALLREC_STORE") or (profile and profile.store)
    args.store = args.store or DEFAULT_STORE
    if not any(getattr(args, name) for name in TLS_OPTIONS):
        if ca_file := os.environ.get("CALLREC_CA_FILE"):
            args.ca_file = Path(ca_file).expanduser()
        elif profile:
            for name in TLS_OPTIONS:
                setattr(args, name, getattr(profile, name))
    args.purpose = args.purpose or args.command_purpose or _environment_purpose()
    args.purpose = args.purpose or (profile and profile.purpose)
    if not args.purpose:
        where = f"set purpose in [client] of {profile.path}" if profile else "or a profile"
        raise UsageError(
            f"--purpose: required, one of {', '.join(sorted(PURPOSES))} ({where}; "
            'see README, "The people\'s CLI profile")'
        )
    args.profile = profile


def _environment_purpose() -> str | None:
    purpose = os.environ.get("CALLREC_PURPOSE")
    if purpose and purpose not in PURPOSES:
        raise UsageError(
            f"$CALLREC_PURPOSE = {purpose!r}: expected one of {', '.join(sorted(PURPOSES))}"
        )
    return purpose or None


def channel(args: argparse.Namespace) -> grpc.Channel:
    files = (args.ca_file, args.cert_file, args.key_file)
    if all(files):
        from agent.certs import channel_credentials

        return grpc.secure_channel(args.store, channel_credentials(*files))
    if args.ca_file and not (args.cert_file or args.key_file):
        # The store's people's port ([store] access_listen): TLS, the token says who.
        credentials = grpc.ssl_channel_credentials(root_certificates=args.ca_file.read_bytes())
        return grpc.secure_channel(args.store, credentials)
    if any(files):
        raise UsageError("--cert-file and --key-file go together (with --ca-file)")
    if not is_loopback(args.store):
        raise UsageError(f"--store {args.store}: plain text only to loopback; give TLS files")
    return grpc.insecure_channel(args.store)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str]]:
    """--token-file, else $CALLREC_TOKEN, else the profile's token_file/token_command."""
    profile: ClientProfile | None = getattr(args, "profile", None)
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    elif os.environ.get("CALLREC_TOKEN", "").strip():
        token = os.environ["CALLREC_TOKEN"].strip()
    else:
        token = (profile.token() if profile else None) or ""
    if not token:
        raise UsageError(
            "no token: set $CALLREC_TOKEN, give --token-file, or set token_file or "
            "token_command in the profile"
        )
    return (("authorization", f"Bearer {token}"),)


def common(args: argparse.Namespace) -> dict[str, Any]:
    return {"purpose": PURPOSES[args.purpose], "reason": args.reason}


# ---------------------------------------------------------------- a recording shown

VIEW_FIELDS = (*RECORDING_FIELDS, "restricted", "legal_hold", "destroy_after")


def _iso(stamp: Timestamp) -> str:
    return stamp.ToDatetime(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def view_row(view: apb.RecordingView) -> dict[str, object]:
    """A recording's stable fields for --json/--csv: the masked number only, ever."""
    return {
        **recording_fields(view.info, _iso),
        "restricted": view.restricted,
        "legal_hold": view.legal_hold,
        "destroy_after": _iso(view.destroy_after) if view.HasField("destroy_after") else None,
    }
