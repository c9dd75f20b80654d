"""Who is who on a recorded call, and which stream is whose. Pure functions.

Each SIPREC participant (in metadata document order) is tagged by the first rule
that matches one of its AoRs (``nameID aor`` values):

1. **employee** — the AoR is a person's SIP identity in the directory
   (:meth:`Directory.find_by_aor`);
2. **service line** — it normalises (E.164, configured region) to one of the
   configured service numbers;
3. **customer** — it is a valid phone number (``phonenumbers.is_valid_number``);
4. **withheld customer** — it is anonymous/restricted (``sip:anonymous@anonymous.invalid``);
5. **internal** — anything else (an extension like ``sip:1099@pbx`` that is not in the
   directory, a non-numeric AoR). Participants without an AoR are ignored.

Then:

- the customer is the first customer participant, else the first withheld one
  (masked ``anonymous``, :attr:`Flag.CUSTOMER_WITHHELD`), else unknown
  (:attr:`Flag.CUSTOMER_UNKNOWN`). The raw number goes straight into
  :meth:`Protector.protect`; only the protected form leaves this module;
- the employees are the directory matches; without one, the first internal
  participant is an employee with id and name ``unknown`` (:attr:`Flag.EMPLOYEE_UNKNOWN`;
  the caller logs a warning). Its AoR is kept with long digit runs redacted;
- the service number is the service participant's E.164, else
  :attr:`Flag.SERVICE_UNKNOWN`;
- direction: **inbound** if the first participant (with an AoR) is the customer,
  **outbound** if it is anyone else, unknown if nobody has an AoR;
- streams: the customer's sent stream (via its ``<send>`` stream id → ``<label>`` →
  the SDP m-line with that ``a=label``) is the customer leg; a stream sent by an
  employee, internal party or service line (in that order, then anyone else) is the
  employee leg. A leg
  the associations do not give falls back to m-line order (first audio m-line =
  customer, second = employee), skipping an m-line the other leg already took.

A plain (non-SIPREC) INVITE names its parties in configured headers instead
(:func:`classify_headers`); its single stream is the mixed leg and its direction comes
from a header too (``inbound``/``outbound``), else it is unknown.

A metadata update in a re-INVITE or UPDATE (a transfer: a new employee joins) is
classified the same way and merged into the capture by ``agent.recorder.party_updates``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import phonenumbers

from agent.capture import (
    CUSTOMER_LEG,
    EMPLOYEE_LEG,
    MIXED_LEG,
    UNKNOWN,
    Direction,
    Flag,
)
from agent.config import SipClient
from agent.directory import Directory, Person
from agent.privacy import NumberKind, ProtectedNumber, Protector, normalise
from agent.recorder.siprec import (
    MetadataError,
    MetadataMissing,
    Participant,
    RecordingMetadata,
    SdpMedia,
    SipParseError,
    audio_streams,
    parse_invite,
    parse_metadata,
    parse_sdp,
)
from agent.redaction import redact_numbers


@dataclass(frozen=True)
class EmployeeTag:
    id: str  # directory id, or "unknown"
    name: str  # directory name, or "unknown"
    aor: str  # the SIP identity seen on the call (digit runs redacted if unknown)
    team: str | None = None

    @classmethod
    def of(cls, person: Person, aor: str) -> EmployeeTag:
        return cls(person.id, person.name, aor, person.team)


@dataclass(frozen=True)
class CallParties:
    direction: Direction
    customer: ProtectedNumber
    employees: tuple[EmployeeTag, ...]
    service_number: str | None  # E.164
    customer_stream: int | None  # SDP m-line index of the customer's leg
    employee_stream: int | None  # SDP m-line index of the employee's leg
    flags: tuple[Flag, ...]


@dataclass(frozen=True)
class PartyRules:
    """What classification needs from config, built once per worker."""

    protector: Protector
    service_numbers: frozenset[str]  # E.164

    @classmethod
    def build(cls, protector: Protector, service_numbers: Iterable[str]) -> PartyRules:
        e164: set[str] = set()
        for raw in service_numbers:
            norm = normalise(raw, protector.region)
            if norm.e164 is None:
                raise ValueError(f"service number {raw!r} is not a phone number")
            e164.add(norm.e164)
        return cls(protector, frozenset(e164))

    @property
    def region(self) -> str:
        return self.protector.region


class _Kind(enum.Enum):
    """What one participant is on the call (the module's rules 1-5)."""

    EMPLOYEE = "employee"
    SERVICE = "service"
    CUSTOMER = "customer"
    WITHHELD = "withheld"
    INTERNAL = "internal"
    NONE = "none"  # no AoR at all


@dataclass(frozen=True)
class _Tagged:
    participant: Participant
    kind: _Kind
    aor: str | None = None  # the AoR that decided the kind
    person: Person | None = None
    e164: str | None = None  # service numbers only


def _is_valid_number(e164: str) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(e164))
    except phonenumbers.NumberParseException:
        return False


def _tag(participant: Participant, directory: Directory, rules: PartyRules) -> _Tagged:
    for aor in participant.aors:
        if (person := directory.find_by_aor(aor)) is not None:
            return _Tagged(participant, _Kind.EMPLOYEE, aor, person=person)
    found: _Tagged | None = None
    for aor in participant.aors:
        norm = normalise(aor, rules.region)
        if norm.e164 is not None and norm.e164 in rules.service_numbers:
            return _Tagged(participant, _Kind.SERVICE, aor, e164=norm.e164)
        if found is not None:
            continue
        if norm.e164 is not None and _is_valid_number(norm.e164):
            found = _Tagged(participant, _Kind.CUSTOMER, aor)
        elif norm.kind is NumberKind.ANONYMOUS:
            found = _Tagged(participant, _Kind.WITHHELD, aor)
    if found is not None:
        return found
    if participant.aors:
        return _Tagged(participant, _Kind.INTERNAL, participant.aors[0])
    return _Tagged(participant, _Kind.NONE)


def _first(tagged: Sequence[_Tagged], *kinds: _Kind) -> _Tagged | None:
    for kind in kinds:
        for item in tagged:
            if item.kind is kind:
                return item
    return None


def _unknown_employee(aor: str) -> EmployeeTag:
    return EmployeeTag(UNKNOWN, UNKNOWN, redact_numbers(aor))


def _employees(tagged: Sequence[_Tagged], flags: list[Flag]) -> tuple[EmployeeTag, ...]:
    known: dict[str, EmployeeTag] = {}
    for t in tagged:
        if t.person is not None:
            known.setdefault(t.person.id, EmployeeTag.of(t.person, t.aor or ""))
    if known:
        return tuple(known.values())
    flags.append(Flag.EMPLOYEE_UNKNOWN)
    internal = _first(tagged, _Kind.INTERNAL)
    return (_unknown_employee(internal.aor if internal and internal.aor else ""),)


def _protect(raw: str | None, rules: PartyRules, flags: list[Flag]) -> ProtectedNumber:
    """The customer's protected number; the raw one goes no further than here."""
    protected = rules.protector.protect(raw)
    if protected.kind is NumberKind.ANONYMOUS:
        flags.append(Flag.CUSTOMER_WITHHELD)
    elif protected.kind is not NumberKind.NUMBER:
        flags.append(Flag.CUSTOMER_UNKNOWN)
    return protected


def _direction(tagged: Sequence[_Tagged], customer: _Tagged | None) -> Direction:
    first = next((t for t in tagged if t.kind is not _Kind.NONE), None)
    if first is None:
        return Direction.UNKNOWN
    return Direction.INBOUND if first is customer else Direction.OUTBOUND


def _sent_stream(
    item: _Tagged | None, metadata: RecordingMetadata, audio: Sequence[SdpMedia]
) -> int | None:
    """The m-line index of the first stream this participant sends that the SDP has."""
    if item is None:
        return None
    by_label = {m.label: m.index for m in audio if m.label is not None}
    for stream_id in item.participant.sends:
        label = metadata.label_of(stream_id)
        if label is not None and label in by_label:
            return by_label[label]
    return None


_EMPLOYEE_SIDE = (_Kind.EMPLOYEE, _Kind.INTERNAL, _Kind.SERVICE, _Kind.CUSTOMER, _Kind.WITHHELD)


def _streams(
    tagged: Sequence[_Tagged],
    customer: _Tagged | None,
    metadata: RecordingMetadata,
    audio: Sequence[SdpMedia],
) -> tuple[int | None, int | None]:
    customer_stream = _sent_stream(customer, metadata, audio)
    others = [t for kind in _EMPLOYEE_SIDE for t in tagged if t.kind is kind and t is not customer]
    employee_stream = next(
        (
            index
            for t in others
            if (index := _sent_stream(t, metadata, audio)) is not None and index != customer_stream
        ),
        None,
    )
    return fill_streams(customer_stream, employee_stream, audio)


def fill_streams(
    customer: int | None, employee: int | None, audio: Sequence[SdpMedia]
) -> tuple[int | None, int | None]:
    """Complete a stream mapping from m-line order: first = customer, second = employee."""
    if customer is None:
        customer = next((m.index for m in audio if m.index != employee), None)
    if employee is None:
        employee = next((m.index for m in audio if m.index != customer), None)
    return customer, employee


def classify(
    metadata: RecordingMetadata,
    audio: Sequence[SdpMedia],
    directory: Directory,
    rules: PartyRules,
) -> CallParties:
    """Apply the module's rules to a SIPREC call's metadata and audio m-lines."""
    tagged = [_tag(p, directory, rules) for p in metadata.participants]
    flags: list[Flag] = []
    chosen = _first(tagged, _Kind.CUSTOMER, _Kind.WITHHELD)
    customer = _protect(chosen.aor if chosen else None, rules, flags)
    employees = _employees(tagged, flags)
    service = _first(tagged, _Kind.SERVICE)
    if service is None:
        flags.append(Flag.SERVICE_UNKNOWN)
    customer_stream, employee_stream = _streams(tagged, chosen, metadata, audio)
    return CallParties(
        direction=_direction(tagged, chosen),
        customer=customer,
        employees=employees,
        service_number=service.e164 if service else None,
        customer_stream=customer_stream,
        employee_stream=employee_stream,
        flags=tuple(dict.fromkeys(flags)),
    )


def unclassified(audio: Sequence[SdpMedia], *flags: Flag) -> CallParties:
    """A call whose parties nobody told us (metadata missing or unreadable)."""
    customer_stream, employee_stream = fill_streams(None, None, audio)
    return CallParties(
        direction=Direction.UNKNOWN,
        customer=ProtectedNumber(NumberKind.UNKNOWN, NumberKind.UNKNOWN.value),
        employees=(_unknown_employee(""),),
        service_number=None,
        customer_stream=customer_stream,
        employee_stream=employee_stream,
        flags=tuple(
            dict.fromkeys(
                (*flags, Flag.CUSTOMER_UNKNOWN, Flag.EMPLOYEE_UNKNOWN, Flag.SERVICE_UNKNOWN)
            )
        ),
    )


_DIRECTION_WORDS = {
    "inbound": Direction.INBOUND,
    "in": Direction.INBOUND,
    "incoming": Direction.INBOUND,
    "outbound": Direction.OUTBOUND,
    "out": Direction.OUTBOUND,
    "outgoing": Direction.OUTBOUND,
}


def header_direction(value: str | None) -> Direction:
    """``inbound``/``outbound`` (or in/out, incoming/outgoing) from a header."""
    word = (value or "").split(";", 1)[0].strip().lower()
    return _DIRECTION_WORDS.get(word, Direction.UNKNOWN)


def classify_headers(
    customer: str | None,
    employee: str | None,
    service: str | None,
    directory: Directory,
    rules: PartyRules,
    direction: str | None = None,
) -> CallParties:
    """A plain INVITE's parties from the configured headers (one mixed stream)."""
    flags: list[Flag] = []
    protected = _protect(customer, rules, flags)
    person = directory.find_by_aor(employee) if employee else None
    if person is not None:
        tag = EmployeeTag.of(person, employee or "")
    else:
        flags.append(Flag.EMPLOYEE_UNKNOWN)
        tag = _unknown_employee(employee or "")
    norm = normalise(service, rules.region)
    service_number = norm.e164 if norm.e164 in rules.service_numbers else None
    if service_number is None:
        flags.append(Flag.SERVICE_UNKNOWN)
    return CallParties(
        direction=header_direction(direction),
        customer=protected,
        employees=(tag,),
        service_number=service_number,
        customer_stream=None,
        employee_stream=None,
        flags=tuple(flags),
    )


# ---------------------------------------------------------------- one incoming INVITE


@dataclass(frozen=True)
class PartyHeaders:
    """Headers that name the parties of a plain (non-SIPREC) INVITE."""

    customer: str
    employee: str
    service: str
    direction: str = "X-Callrec-Direction"


@dataclass(frozen=True)
class CallPlan:
    """What to record for one INVITE and whom it concerns."""

    source: str  # "siprec" or "plain"
    parties: CallParties
    legs: Mapping[int, str]  # SDP m-line index → leg file name
    audio_count: int  # audio m-lines in the offer (answer with this many)
    problem: str | None = None  # why the metadata could not be used
    siprec: bool = True  # False: a plain INVITE (no siprec option tag, no metadata)


def _legs(parties: CallParties, audio: Sequence[SdpMedia]) -> dict[int, str]:
    if len(audio) == 1:
        return {audio[0].index: MIXED_LEG}
    legs: dict[int, str] = {}
    if parties.customer_stream is not None:
        legs[parties.customer_stream] = CUSTOMER_LEG
    if parties.employee_stream is not None:
        legs[parties.employee_stream] = EMPLOYEE_LEG
    return legs


def plan_call(
    raw: str | bytes,
    directory: Directory,
    rules: PartyRules,
    headers: PartyHeaders,
    offered_audio: int,
    client: SipClient | None = None,
    metadata: str | None = None,
) -> CallPlan:
    """Parse and classify an INVITE. Never raises for bad input: a call whose metadata
    cannot be read is still recorded, flagged :attr:`Flag.METADATA_INVALID` (or
    :attr:`Flag.METADATA_MISSING` when it has none). ``client``: what the recording
    client's configuration adds where the metadata is silent (:func:`apply_client`).

    ``offered_audio`` is pjsua's count of audio m-lines, used when the body cannot be
    read here; ``metadata``: the document the front kept aside for this INVITE."""
    try:
        invite = parse_invite(raw)
        if metadata is not None:
            invite = replace(invite, metadata=metadata, siprec=True)
        media = parse_sdp(invite.sdp) if invite.sdp is not None else ()
    except SipParseError as exc:
        audio = tuple(SdpMedia(i, "audio", 1, None, "sendonly") for i in range(offered_audio))
        parties = unclassified(audio, Flag.METADATA_INVALID)
        return CallPlan("siprec", parties, _legs(parties, audio), offered_audio, str(exc))
    audio = audio_streams(media)
    audio_count = sum(1 for m in media if m.kind == "audio") or offered_audio
    if not invite.siprec and len(audio) == 1:
        employee_header = (client.employee_header if client else None) or headers.employee
        parties = classify_headers(
            invite.header(headers.customer),
            invite.header(employee_header),
            invite.header(headers.service),
            directory,
            rules,
            invite.header(headers.direction),
        )
        parties = apply_client(parties, invite.headers, client, directory, rules)
        return CallPlan("plain", parties, _legs(parties, audio), audio_count, siprec=False)
    problem: str | None = None
    try:
        parties = classify(parse_metadata(invite.metadata), audio, directory, rules)
    except MetadataMissing as exc:
        parties, problem = unclassified(audio, Flag.METADATA_MISSING), str(exc)
    except MetadataError as exc:
        parties, problem = unclassified(audio, Flag.METADATA_INVALID), str(exc)
    parties = apply_client(parties, invite.headers, client, directory, rules)
    return CallPlan(
        "siprec", parties, _legs(parties, audio), audio_count, problem, siprec=invite.siprec
    )


def first_value(value: str | None) -> str | None:
    """The first entry of a comma-separated header value (``Diversion``,
    ``History-Info``), commas inside ``<…>`` or quotes left alone."""
    if value is None:
        return None
    depth, quoted = 0, False
    for index, char in enumerate(value):
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "<>":
            depth += 1 if char == "<" else -1
        elif char == "," and not quoted and depth <= 0:
            return value[:index].strip() or None
    return value.strip() or None


def apply_client(
    parties: CallParties,
    headers: Mapping[str, str],
    client: SipClient | None,
    directory: Directory,
    rules: PartyRules,
) -> CallParties:
    """Fill what the metadata left out from the recording client's configured sources:
    the service line (a header, or a fixed number: only a configured service number
    is taken, so a misconfigured header cannot put a customer's number there) and the
    employee (a header naming a directory AoR). Nothing the metadata said is replaced."""
    if client is None:
        return parties
    flags = list(parties.flags)
    service = parties.service_number
    if service is None:
        raw = client.service_number
        if client.service_header:
            raw = first_value(headers.get(client.service_header.lower()))
        e164 = normalise(raw, rules.region).e164 if raw else None
        if e164 is not None and e164 in rules.service_numbers:
            service = e164
            flags = [f for f in flags if f is not Flag.SERVICE_UNKNOWN]
    employees = parties.employees
    if client.employee_header and all(e.id == UNKNOWN for e in employees):
        aor = first_value(headers.get(client.employee_header.lower()))
        person = directory.find_by_aor(aor) if aor else None
        if person is not None:
            employees = (EmployeeTag.of(person, aor or ""),)
            flags = [f for f in flags if f is not Flag.EMPLOYEE_UNKNOWN]
    return replace(parties, service_number=service, employees=employees, flags=tuple(flags))
