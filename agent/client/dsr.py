"""``callrec dsr``: the privacy officer's tasks, grouped (the handlers are in
``agent.cli.access``). Every one of them is audited with its reason and defaults to
``--purpose legal``.

    callrec dsr find --at T [--window 15m] --reason R   a customer's calls (number on stdin)
    callrec dsr export ID… --out package.zip --reason R  the customer's copy (Art. 15/20)
    callrec dsr rectify ID --to EMPLOYEE --reason R      correct the employee tag (Art. 16)
    callrec dsr erase ID --reason R                      erase a recording (Art. 17)
    callrec dsr restrict|unrestrict ID --reason R        restrict processing (Art. 18)
    callrec dsr hold|release ID --reason R               legal hold past retention
    callrec dsr unseal ID --reason R                     the sealed last three digits

``callrec hold|release|rectify|unseal`` (the spellings before the group) still work
for this release, with a deprecation line on stderr, and are left out of the help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import phonenumbers

from agent.cli import tabular
from agent.client.options import add_client_options

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

WithId = Callable[..., Any]  # access_cli._with_id(sub, name, help, purpose) -> parser
OLD_SPELLINGS = frozenset({"hold", "release", "rectify", "unseal"})

DESCRIPTION = """\
A data subject's requests and the register's legal duties, each audited with its
reason (a case id). Typical order: `find` the customer's calls from their number and
the time they give, then `export` their copy, `rectify`, `erase` or `restrict` as they
ask; `hold` keeps recordings a legal case needs past the retention until `release`.
"""

TASKS = (
    ("erase", "erase a recording for good (Art. 17): its key is shredded at once"),
    ("restrict", "restrict processing (Art. 18): metadata stays, audio for legal use only"),
    ("unrestrict", "lift a restriction"),
    ("hold", "legal hold: keep a recording past the retention until released"),
    ("release", "release a legal hold; the sweeper then applies the retention"),
    ("unseal", "open the sealed last three digits of the customer's number"),
)


def add_parsers(sub: SubParsers, with_id: WithId) -> None:
    dsr = sub.add_parser(
        "dsr",
        help="data-subject requests and legal holds (privacy officer)",
        description=DESCRIPTION,
    )
    dsub = dsr.add_subparsers(dest="dsr_command", required=True, metavar="TASK")
    find = dsub.add_parser("find", help="find a customer's calls from their number and a time")
    add_client_options(find, "legal")
    tabular.add_output_options(find)
    # Refused when given: a number on the command line is in the process list (ps,
    # /proc/*/cmdline) and the shell's history. Defined so argparse does not echo it.
    find.add_argument("--number", help=argparse.SUPPRESS)
    find.add_argument(
        "--region",
        type=region,
        default="FI",
        help="how a national number is read: a region code (default FI)",
    )
    find.add_argument("--at", required=True, help="ISO time of the call")
    find.add_argument("--window", default="15m", help="± around --at")
    package = dsub.add_parser(
        "export", help="the customer's copy (Art. 15/20): audio + metadata JSON in a ZIP"
    )
    package.add_argument("recording_ids", nargs="+", help="as `dsr find` shows them")
    package.add_argument("--out", type=Path, required=True, help="the ZIP file to write")
    add_client_options(package, "legal")
    _rectify(with_id(dsub, "rectify", "correct a recording's employee tag (Art. 16)", "legal"))
    for name, text in TASKS:
        with_id(dsub, name, text, "legal")
    _old_spellings(sub)


def region(text: str) -> str:
    """A region phone numbers are written in (``FI``, ``se``): refused here, not by
    the store, when it is not one."""
    code = text.strip().upper()
    if code not in phonenumbers.SUPPORTED_REGIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a region code such as FI or SE")
    return code


def _rectify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, help="the right employee's directory id")
    parser.add_argument("--from", dest="wrong", default="", help="default: the tagged one")


def _old_spellings(sub: SubParsers) -> None:
    """``callrec hold`` etc.: no help=, so `callrec --help` lists only ``dsr``."""
    for name in sorted(OLD_SPELLINGS):
        parser = sub.add_parser(name, description=f"deprecated: use `callrec dsr {name}`")
        parser.add_argument("recording_id", help="as `callrec search` shows it")
        add_client_options(parser, "legal")
        if name == "rectify":
            _rectify(parser)


def old_spelling(args: argparse.Namespace) -> None:
    """Run ``callrec hold …`` as ``callrec dsr hold …``, saying so on stderr."""
    name = args.command
    sys.stderr.write(
        f"callrec {name}: deprecated, use `callrec dsr {name}` (the old spelling goes "
        "in a later release)\n"
    )
    args.command, args.dsr_command = "dsr", name
