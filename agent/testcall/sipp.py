"""SIPp as the PBX: run a scenario (:mod:`agent.testcall.scenario`) and read back what
happened to each call from the ``<log>`` stamps (``answered``, ``bye``,
``bye_received``, ``refused``, ``cancelled``, each with the Call-ID and epoch time).

The scenario builders are re-exported here, so callers need one import.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.testcall.ports import free_port
from agent.testcall.scenario import (
    DRAFT_NS,
    MALFORMED_METADATA,
    RFC7865_NS,
    Midcall,
    Party,
    SiprecCall,
    cancel_scenario,
    metadata_xml,
    plain_scenario,
    refused_scenario,
    siprec_scenario,
)

__all__ = [
    "DRAFT_NS",
    "MALFORMED_METADATA",
    "RFC7865_NS",
    "CallLog",
    "Midcall",
    "Party",
    "SippResult",
    "SiprecCall",
    "cancel_scenario",
    "free_port",
    "metadata_xml",
    "plain_scenario",
    "refused_scenario",
    "run_sipp",
    "siprec_scenario",
]


@dataclass
class CallLog:
    """What one call of a SIPp run did, as epoch seconds."""

    call_id: str
    answered_at: float | None = None
    bye_at: float | None = None  # the SRC sent BYE
    bye_received_at: float | None = None  # the recorder hung up
    refused_status: int | None = None  # 486/503 instead of an answer
    cancelled_at: float | None = None


@dataclass(frozen=True)
class SippResult:
    returncode: int
    stdout: str
    errors: str  # the -trace_err file: unexpected messages, timeouts
    log: str  # the <log> actions
    elapsed_s: float
    calls: dict[str, CallLog] = field(default_factory=dict)  # by Call-ID, in start order

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def first(self) -> CallLog | None:
        return next(iter(self.calls.values()), None)

    @property
    def call_id(self) -> str | None:
        """The Call-ID SIPp generated (of the first call)."""
        return self.first.call_id if self.first else None

    @property
    def answered_at(self) -> float | None:
        """Epoch seconds: SIPp received the 200 OK (first call)."""
        return self.first.answered_at if self.first else None

    @property
    def bye_at(self) -> float | None:
        """Epoch seconds: SIPp sent the BYE, or received the recorder's (first call)."""
        first = self.first
        return (first.bye_at or first.bye_received_at) if first else None


# SIPp's [timestamp] ends with the epoch time: "2024-01-02\t03:04:05.678901\t1704164645.678901"
_EVENT = re.compile(
    r"^(answered|bye|bye_received|refused|cancelled) (\S+) .*?(\d{9,}\.\d+)(?: status=(\d+))?\s*$",
    re.MULTILINE,
)


def parse_calls(log_text: str) -> dict[str, CallLog]:
    calls: dict[str, CallLog] = {}
    for event, call_id, epoch, status in _EVENT.findall(log_text):
        call = calls.setdefault(call_id, CallLog(call_id))
        if event == "refused":
            call.refused_status = int(status)
        else:
            setattr(call, f"{event}_at", float(epoch))
    return calls


def run_sipp(
    scenario_xml: str,
    target: tuple[str, int],
    workdir: Path,
    *,
    timeout_s: float = 60.0,
    calls: int = 1,
    rate: float | None = None,
    extra_args: Sequence[str] = (),
    local_ip: str = "127.0.0.1",
) -> SippResult:
    """Run SIPp in the foreground (never ``-bg``) and report what happened. ``calls``
    calls at once (``-l``) at ``rate`` per second, sent from ``local_ip``."""
    workdir.mkdir(parents=True, exist_ok=True)
    scenario = workdir / "scenario.xml"
    scenario.write_text(scenario_xml)
    errors, logs = workdir / "sipp_errors.log", workdir / "sipp_logs.log"
    for stale in (errors, logs):
        stale.unlink(missing_ok=True)
    args = [
        "sipp", f"{target[0]}:{target[1]}", "-sf", str(scenario),
        "-m", str(calls), "-l", str(calls), "-i", local_ip,
        "-p", str(free_port()), "-mp", str(free_port(4)),
        "-timeout", f"{int(timeout_s)}s", "-timeout_error", "-nostdin",
        "-trace_err", "-error_file", str(errors), "-trace_logs", "-log_file", str(logs),
        *(["-r", str(rate)] if rate else []),
        *extra_args,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        args,
        cwd=workdir,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s + 15,
        check=False,
    )
    log_text = logs.read_text() if logs.exists() else ""
    return SippResult(
        returncode=proc.returncode,
        stdout=proc.stdout[-4000:],
        errors=errors.read_text(errors="replace") if errors.exists() else "",
        log=log_text,
        elapsed_s=time.monotonic() - started,
        calls=parse_calls(log_text),
    )
