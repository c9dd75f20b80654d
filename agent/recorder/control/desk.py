"""The control API's work, free of HTTP: find a call, reach the worker holding it, and
bind an employee to a recording still in the outbox.

A live call is found from the captures the workers are writing
(``captures/active/w<N>/<id>/capture.json``: recording id, hashed Call-ID, employees'
SIP identities and ids), so finding needs no worker; the command then goes to worker
``N`` over its control channel. A call that ended is in ``captures/ready`` (being
finalized) or in the outbox (waiting for the store); one not on this agent any more was
uploaded (or never recorded here).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from agent import logs
from agent.capture import CaptureMeta, Employee, iso_ms, read_meta, utc_now
from agent.config import AgentConfig
from agent.directory import LiveDirectory, aor_keys
from agent.pb.callrec.v1 import recordings_pb2 as pb
from agent.recorder.control.calls import call_status, live_state
from agent.recorder.control.channel import ask_worker, channel_name
from agent.recorder.finalize import MANIFEST_FILE
from agent.recorder.session import call_ref
from agent.recorder.uplink.outbox import Outbox

log = logs.get_logger(__name__)

SELECTORS = ("recording_id", "call_id", "extension", "sip", "person")
WORKER_TIMEOUT_S = 2.0
LOCK_WAIT_S = 2.0


@dataclass(frozen=True)
class Reply:
    status: int
    doc: dict[str, Any]


@dataclass(frozen=True)
class LiveCall:
    worker: int
    meta: CaptureMeta


def _error(status: int, message: str, **more: Any) -> Reply:
    return Reply(status, {"error": message, **more})


def _matches(meta: CaptureMeta, key: str, value: str) -> bool:
    if key == "recording_id":
        return meta.recording_id == value
    if key == "call_id":
        return meta.call_ref == call_ref(value)
    if key == "person":
        return any(e.id == value for e in meta.employees)
    wanted = aor_keys(value)
    if key == "extension":  # the user part of an employee's SIP identity
        return any(aor_keys(e.aor)[-1] == wanted[-1] for e in meta.employees if e.aor)
    return any(aor_keys(e.aor)[0] == wanted[0] for e in meta.employees if e.aor)  # sip


class ControlDesk:
    def __init__(self, cfg: AgentConfig, directory: LiveDirectory, outbox: Outbox) -> None:
        self.cfg = cfg
        self.directory = directory
        self.outbox = outbox
        self.active_dir = cfg.captures_dir / "active"
        self.ready_dir = cfg.captures_dir / "ready"

    # ------------------------------------------------------------ finding

    def _active(self, key: str, value: str) -> list[LiveCall]:
        """The captures the workers hold (live, or ended and about to move) that match."""
        found: list[LiveCall] = []
        for worker_dir in sorted(self.active_dir.glob("w*")):
            index = worker_dir.name[1:]
            if not index.isdigit():
                continue
            for capture in worker_dir.iterdir():
                try:
                    meta = read_meta(capture)
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # not answered yet, or being written
                if _matches(meta, key, value):
                    found.append(LiveCall(int(index), meta))
        return found

    def live_calls(self, key: str, value: str) -> list[LiveCall]:
        return [c for c in self._active(key, value) if c.meta.ended_at is None]

    def ended(self, key: str, value: str) -> CaptureMeta | pb.Manifest | str | None:
        """The call if it ended: its metadata while still on this agent (ready or
        outbox), its recording id if uploaded lately."""
        if key not in ("recording_id", "call_id"):
            return None
        uploaded = self.outbox.uploaded.find(
            value if key == "recording_id" else None,
            call_ref(value) if key == "call_id" else None,
        )
        if uploaded is not None:
            return uploaded
        closing = [c.meta for c in self._active(key, value) if c.meta.ended_at is not None]
        if closing:  # ended, its capture about to move to ready
            return closing[0]
        for capture in self._candidates(self.ready_dir, key, value):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                meta = read_meta(capture)
                if _matches(meta, key, value):
                    return meta
        for entry in self._candidates(self.outbox.root, key, value):
            with contextlib.suppress(OSError, ValueError):
                manifest = self.outbox.open(entry.name).manifest
                if key == "recording_id" or manifest.call_ref == call_ref(value):
                    return manifest
        return None

    @staticmethod
    def _candidates(root: Path, key: str, value: str) -> list[Path]:
        if key == "recording_id":
            path = root / value
            return [path] if path.is_dir() else []
        with contextlib.suppress(OSError):
            return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return []

    # ------------------------------------------------------------ commands

    def status(self, key: str, value: str) -> Reply:
        calls = self.live_calls(key, value)
        if calls:
            docs = [call_status(c.meta, live_state(c.meta)) for c in calls]
            return Reply(200, {"calls": docs})
        ended = self.ended(key, value)
        if isinstance(ended, CaptureMeta):
            return Reply(200, {"calls": [call_status(ended, "ended")]})
        if isinstance(ended, str):
            return Reply(200, {"calls": [{"recording_id": ended, "state": "uploaded"}]})
        if ended is not None:
            return Reply(200, {"calls": [_manifest_status(ended)]})
        return _error(404, f"no call with that {key} on this agent")

    def command(self, op: str, key: str, value: str, who: str, body: dict[str, Any]) -> Reply:
        """pause, resume, discard or employee on the one live call selected."""
        calls = self.live_calls(key, value)
        if len(calls) > 1:
            ids = [c.meta.recording_id for c in calls]
            message = f"{len(calls)} live calls match; choose one by recording_id"
            return _error(409, message, calls=ids)
        request: dict[str, Any] = {"op": op, "who": who}
        if op == "employee":
            employee = self.resolve_employee(body.get("employee"))
            if isinstance(employee, Reply):
                return employee
            if not calls:
                return self._bind_ended(key, value, employee, who)
            request["employee"] = {
                "id": employee.id, "name": employee.name, "aor": employee.aor,
                "team": employee.team,
            }  # fmt: skip
        if not calls:
            if self.ended(key, value) is not None:
                return _error(409, "the call has ended")
            return _error(404, f"no live call with that {key} on this agent")
        call = calls[0]
        request["recording_id"] = call.meta.recording_id
        name = channel_name(self.cfg.captures_dir, call.worker)
        try:
            sip = self.cfg.sip.worker_sip(call.worker)
            reply = ask_worker(name, request, WORKER_TIMEOUT_S, sip)
        except (OSError, ValueError) as exc:
            log.error("control_worker_unreachable", worker=call.worker, error=str(exc))
            return _error(503, f"worker {call.worker} did not answer; retry")
        status = int(reply.pop("status"))
        return Reply(status, reply)

    # ------------------------------------------------------------ late employee binding

    def resolve_employee(self, doc: object) -> Employee | Reply:
        """``{"extension": "1002"}`` or ``{"person": "<directory id>"}`` → the person."""
        if not isinstance(doc, dict) or len(doc) != 1:
            return _error(400, 'employee: expected {"extension": "..."} or {"person": "..."}')
        (key, value), people = next(iter(doc.items())), self.directory.current
        if key not in ("extension", "person") or not isinstance(value, str) or not value:
            return _error(400, 'employee: expected {"extension": "..."} or {"person": "..."}')
        if key == "person":
            person = people.people.get(value)
            aor = person.aors[0] if person is not None and person.aors else ""
        else:
            person, aor = people.find_by_aor(value), value
        if person is None:
            return _error(404, f"employee: no person with that {key} in the directory")
        return Employee(person.id, person.name, aor or person.id, iso_ms(utc_now()), person.team)

    def _bind_ended(self, key: str, value: str, employee: Employee, who: str) -> Reply:
        ended = self.ended(key, value)
        if isinstance(ended, CaptureMeta):
            return _error(409, "the recording is being finalized; retry", retry_after_s=2)
        if ended is None or isinstance(ended, str):
            return _error(
                409 if ended else 404,
                ("uploaded" if ended else "not on this agent")
                + ": an uploaded recording's employee is changed at the store, as a "
                "rectification (callrec rectify ID --to EMPLOYEE)",
            )
        return self._bind_in_outbox(ended.recording_id, employee, who)

    def _bind_in_outbox(self, rid: str, employee: Employee, who: str) -> Reply:
        """Rewrite the outbox entry's manifest under its lock (the uplink takes the same
        one for each upload attempt): before upload, or a clear answer after it."""
        with self.outbox.locked(rid, LOCK_WAIT_S) as held:
            if not held:
                return _error(409, "the recording is being uploaded; retry", retry_after_s=2)
            try:
                entry = self.outbox.open(rid)
            except FileNotFoundError:
                return _error(404, "uploaded meanwhile: rectify the employee at the store")
            manifest = entry.manifest
            if all(e.id != employee.id for e in manifest.employees):
                _bind_in_manifest(manifest, employee)
                _write_manifest(entry.path / MANIFEST_FILE, manifest)
        log.info("employee_bound", recording_id=rid, employee=employee.id, who=who, state="outbox")
        return Reply(200, {"call": _manifest_status(manifest)})


def _bind_in_manifest(manifest: pb.Manifest, employee: Employee) -> None:
    """The employee joins the recording's list; the placeholder for "nobody known"
    gives way (the employee then held the call from its start)."""
    kept = [e for e in manifest.employees if e.id != "unknown"]
    bound = pb.Employee(
        id=employee.id, name=employee.name, aor=employee.aor, team=employee.team or ""
    )
    placeholder = len(kept) < len(manifest.employees) or not kept
    bound.joined_at.CopyFrom(manifest.started_at if placeholder else manifest.ended_at)
    del manifest.employees[:]
    manifest.employees.extend([*kept, bound])
    flags = [f for f in manifest.flags if f != "employee_unknown"]
    del manifest.flags[:]
    manifest.flags.extend(flags)


def _write_manifest(path: Path, manifest: pb.Manifest) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json_format.MessageToJson(manifest, indent=1))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def _manifest_status(m: pb.Manifest) -> dict[str, Any]:
    return {
        "recording_id": m.recording_id,
        "call_ref": m.call_ref,
        "state": "discarded" if "discarded" in m.flags else "ended",
        "paused": False,
        "customer": m.customer.masked,
        "employees": [{"id": e.id, "name": e.name, "aor": e.aor} for e in m.employees],
        "pauses": json.loads(json_format.MessageToJson(m)).get("pauses", []),
        "flags": list(m.flags),
    }
