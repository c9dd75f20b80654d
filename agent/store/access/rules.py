"""Who may do what with which recording: pure functions over the directory, the
person, the operation, the purpose and the recording's facts. No I/O; the Access
service (``access_service.py``) authenticates, calls ``decide`` and audits the answer.

The rules (the privacy notice wins over any restatement):

* Only a person **in the directory** gets anything; a person removed from it gets
  nothing from the next request on (the store re-reads the file when it changes).
* **Everyone needs a training date** (``trained``, not in the future). The notice says
  "Järjestelmän ylläpitäjien ja asiakaspalvelijoiden esimiehineen on läpikäytävä
  järjestelmän käyttöön liittyvä koulutus": administrators *and* agents with their
  supervisors must be trained; the privacy officer is held to the same rule.
* Every request states a purpose from the notice: verification, legal, training,
  security.
* **agent** — own calls only (the agent is among the recording's employees, e.g. after
  a transfer): search (scoped), metadata, play. No export: the notice lets agents
  *listen to* ("kuuntelemaan") their calls, not take copies.
* **supervisor** — the calls of their team: a recording is in scope when one of its
  employees is the supervisor, or is *now* a direct report (``supervisor = <id>`` in
  the directory), or *was in the supervisor's team at the time of the call* (the team
  stored with the recording). Search (scoped), metadata, play, export (training
  material, a complaint).
* **admin** — maintains the system: search and metadata of every recording; audio
  only for purpose *security* (investigating misuse, a fault in the recording chain).
  The notice names admins among those with access but gives listening rights only to
  agents and supervisors, so routine maintenance does not need to hear calls.
* **privacy_officer** — data-subject requests: search and metadata of every
  recording; play/export, find by number, export package, erase, restrict/unrestrict,
  legal hold/release, rectify the employee tag — each for purpose *legal* (handling a
  data subject's rights is a legal obligation); opening the sealed last digits for
  *legal* or *security*. The service also requires a reason (a case reference) for
  these.
* **The audit log** is read by the privacy officer (purpose legal or security) and by
  admins (purpose security: investigating misuse); reading it is audited too.
* A **restricted** recording (GDPR art. 18) is not played or exported (also not in a
  package) except by the privacy officer for purpose *legal*; its metadata stays
  visible, marked restricted.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from enum import StrEnum

from agent.directory import Directory, Person, Role
from agent.redaction import redact_numbers
from agent.store.catalog import RecordingRow


class Operation(StrEnum):
    SEARCH = "search"
    GET = "get"
    PLAY = "play"
    EXPORT = "export"
    FIND_BY_NUMBER = "find_by_number"
    EXPORT_PACKAGE = "export_package"
    ERASE = "erase"
    RESTRICT = "restrict"
    UNRESTRICT = "unrestrict"
    HOLD = "hold"
    RELEASE = "release"
    RECTIFY = "rectify"
    UNSEAL = "unseal"
    SIGN_IN = "sign_in"  # WhoAmI: authentication only, no recording
    AUDIT_VIEW = "audit_view"


class Purpose(StrEnum):
    VERIFICATION = "verification"
    LEGAL = "legal"
    TRAINING = "training"
    SECURITY = "security"


class Verdict(StrEnum):
    ALLOW = "allowed"
    DENY = "denied"
    UNAUTHENTICATED = "unauthenticated"


OFFICER_OPERATIONS = frozenset(
    {
        Operation.FIND_BY_NUMBER,
        Operation.EXPORT_PACKAGE,
        Operation.ERASE,
        Operation.RESTRICT,
        Operation.UNRESTRICT,
        Operation.HOLD,
        Operation.RELEASE,
        Operation.RECTIFY,
        Operation.UNSEAL,
    }
)
AUDIO_OPERATIONS = frozenset({Operation.PLAY, Operation.EXPORT, Operation.EXPORT_PACKAGE})
OFFICER_PURPOSES = {Operation.UNSEAL: frozenset({Purpose.LEGAL, Purpose.SECURITY})}
_LEGAL_ONLY = frozenset({Purpose.LEGAL})


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    why: str  # for the audit log and the error message; never personal data

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


def allow(why: str) -> Decision:
    return Decision(Verdict.ALLOW, why)


def deny(why: str) -> Decision:
    return Decision(Verdict.DENY, why)


@dataclass(frozen=True)
class RecordingFacts:
    """What the rules need to know about a recording."""

    recording_id: str
    employee_ids: frozenset[str]
    teams: frozenset[str]  # the employees' teams at the time of the call
    restricted: bool = False

    @classmethod
    def of(cls, row: RecordingRow) -> RecordingFacts:
        employees = json.loads(row.employees_json)
        ids = {row.employee_id} | {str(e["id"]) for e in employees if e.get("id")}
        teams = {str(e["team"]) for e in employees if e.get("team")}
        if row.employee_team:
            teams.add(row.employee_team)
        return cls(row.recording_id, frozenset(ids), frozenset(teams), row.restricted)


@dataclass(frozen=True)
class Scope:
    """The recordings a person may see: all, or those with one of these employees or
    teams."""

    everything: bool = False
    employee_ids: frozenset[str] = frozenset()
    teams: frozenset[str] = frozenset()

    def covers(self, facts: RecordingFacts) -> bool:
        return (
            self.everything
            or bool(self.employee_ids & facts.employee_ids)
            or bool(self.teams & facts.teams)
        )


def scope_of(person: Person, directory: Directory) -> Scope:
    if person.role in (Role.ADMIN, Role.PRIVACY_OFFICER):
        return Scope(everything=True)
    if person.role is Role.AGENT:
        return Scope(employee_ids=frozenset({person.id}))
    reports = {p.id for p in directory.people.values() if p.supervisor == person.id}
    teams = frozenset({person.team}) if person.team else frozenset()
    return Scope(employee_ids=frozenset(reports | {person.id}), teams=teams)


def trained(person: Person, today: dt.date) -> bool:
    return person.trained is not None and person.trained <= today


def decide(
    person: Person | None,
    operation: Operation,
    purpose: Purpose,
    recording: RecordingFacts | None,
    directory: Directory,
    today: dt.date,
) -> Decision:
    """May ``person`` do ``operation`` for ``purpose`` (on ``recording``, if any)?"""
    if person is None:
        return Decision(Verdict.UNAUTHENTICATED, "not a person in the directory")
    if not trained(person, today):
        return deny(f"{person.role.value} without a training date on record")
    if operation in OFFICER_OPERATIONS:
        return _officer_operation(person, operation, purpose, recording)
    if operation is Operation.AUDIT_VIEW:
        return _audit_view(person, purpose)
    if recording is not None and not scope_of(person, directory).covers(recording):
        return deny(f"recording outside the {person.role.value}'s scope")
    if operation in (Operation.SEARCH, Operation.GET):
        return allow(f"{operation.value} by {person.role.value}")
    return _audio(person, operation, purpose, recording)


def _officer_operation(
    person: Person, operation: Operation, purpose: Purpose, recording: RecordingFacts | None
) -> Decision:
    if person.role is not Role.PRIVACY_OFFICER:
        return deny(f"{operation.value} is for the privacy officer")
    purposes = OFFICER_PURPOSES.get(operation, _LEGAL_ONLY)
    if purpose not in purposes:
        wanted = " or ".join(sorted(p.value for p in purposes))
        return deny(f"{operation.value} needs purpose {wanted}")
    return allow(f"{operation.value} by the privacy officer")


def _audit_view(person: Person, purpose: Purpose) -> Decision:
    """The audit log: the privacy officer (legal, security) and admins (security)."""
    if person.role is Role.PRIVACY_OFFICER and purpose in (Purpose.LEGAL, Purpose.SECURITY):
        return allow(f"audit view by the privacy officer for {purpose.value}")
    if person.role is Role.ADMIN and purpose is Purpose.SECURITY:
        return allow("audit view by an admin for security")
    return deny("the audit log is for the privacy officer and, for security, admins")


def _audio(
    person: Person, operation: Operation, purpose: Purpose, recording: RecordingFacts | None
) -> Decision:
    role = person.role
    if recording is not None and recording.restricted:
        if role is Role.PRIVACY_OFFICER and purpose is Purpose.LEGAL:
            return allow("restricted recording, privacy officer, legal purpose")
        return deny("restricted recording: only the privacy officer, for a legal purpose")
    if role is Role.AGENT:
        if operation is Operation.PLAY:
            return allow("agent plays own call")
        return deny("agents may listen to their calls, not export them")
    if role is Role.SUPERVISOR:
        return allow(f"supervisor, {operation.value} of a team call")
    if role is Role.ADMIN:
        if purpose is Purpose.SECURITY:
            return allow(f"admin, {operation.value} for security")
        return deny("admins get audio only for purpose security")
    if purpose is Purpose.LEGAL:
        return allow(f"privacy officer, {operation.value} for a legal purpose")
    return deny("the privacy officer gets audio only for purpose legal")


def scrub(text: str, limit: int = 200) -> str:
    """A free-text reason fit for the audit log: every possible phone number replaced
    (:func:`agent.redaction.redact_numbers`: a case reference such as ``SR0012345678``,
    a date or a recording id is kept); control characters are dropped."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return redact_numbers(cleaned, "[number removed]")[:limit]
