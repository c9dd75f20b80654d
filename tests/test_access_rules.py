"""The access rules as pure functions: no store, no network."""

from __future__ import annotations

import datetime as dt
import tomllib

import pytest

from agent.directory import Directory
from agent.store.access.rules import (
    Operation,
    Purpose,
    RecordingFacts,
    Verdict,
    decide,
    scope_of,
    scrub,
)
from tests.support.access_world import PEOPLE

TODAY = dt.date(2026, 3, 1)
DIRECTORY = Directory.from_dict(
    tomllib.loads(
        PEOPLE
        + """
[[person]]
id = "a4"
name = "Report Elsewhere"
role = "agent"
team = "telesales"
supervisor = "s1"
trained = 2025-01-10

[[person]]
id = "s9"
name = "Trained Tomorrow"
role = "supervisor"
team = "parcels"
trained = 2026-03-02
"""
    )
)


def rec(*employees: tuple[str, str | None], restricted: bool = False) -> RecordingFacts:
    return RecordingFacts(
        "0" * 32,
        frozenset(e for e, _ in employees),
        frozenset(t for _, t in employees if t),
        restricted,
    )


def verdict(
    person: str | None, op: Operation, purpose: Purpose, recording: RecordingFacts | None
) -> Verdict:
    who = DIRECTORY.people.get(person) if person else None
    return decide(who, op, purpose, recording, DIRECTORY, TODAY).verdict


OK, NO, WHO = Verdict.ALLOW, Verdict.DENY, Verdict.UNAUTHENTICATED
V, L, T, S = Purpose.VERIFICATION, Purpose.LEGAL, Purpose.TRAINING, Purpose.SECURITY
AINO = rec(("a1", "parcels"))
MIKKO = rec(("a2", "telesales"))
TRANSFER = rec(("a2", "telesales"), ("a1", "parcels"))
ELSEWHERE = rec(("a4", "telesales"))  # s1's direct report working in another team


@pytest.mark.parametrize(
    ("person", "op", "purpose", "recording", "expected"),
    [
        ("a1", Operation.PLAY, V, AINO, OK),
        ("a1", Operation.PLAY, T, TRANSFER, OK),  # on the call after a transfer
        ("a1", Operation.PLAY, V, MIKKO, NO),
        ("a1", Operation.EXPORT, V, AINO, NO),  # agents listen, they do not copy
        ("a1", Operation.SEARCH, V, None, OK),
        ("a3", Operation.PLAY, V, rec(("a3", "parcels")), NO),  # untrained agent
        ("s1", Operation.EXPORT, T, AINO, OK),
        ("s1", Operation.PLAY, V, TRANSFER, OK),  # a parcels employee was on it
        ("s1", Operation.PLAY, V, ELSEWHERE, OK),  # direct report, other team
        ("s1", Operation.PLAY, V, MIKKO, NO),
        ("s2", Operation.PLAY, V, AINO, NO),
        ("s2", Operation.PLAY, V, TRANSFER, OK),
        ("s3", Operation.SEARCH, V, None, NO),  # untrained supervisor
        ("s9", Operation.GET, V, AINO, NO),  # training date in the future
        ("ad", Operation.GET, V, MIKKO, OK),
        ("ad", Operation.PLAY, V, MIKKO, NO),
        ("ad", Operation.PLAY, S, MIKKO, OK),
        ("ad", Operation.ERASE, L, MIKKO, NO),
        ("po", Operation.GET, V, MIKKO, OK),
        ("po", Operation.PLAY, V, MIKKO, NO),
        ("po", Operation.PLAY, L, MIKKO, OK),
        ("po", Operation.ERASE, L, MIKKO, OK),
        ("po", Operation.ERASE, V, MIKKO, NO),
        ("po", Operation.FIND_BY_NUMBER, L, None, OK),
        ("po", Operation.UNSEAL, S, MIKKO, OK),
        ("po", Operation.UNSEAL, T, MIKKO, NO),
        ("s1", Operation.FIND_BY_NUMBER, L, None, NO),
        ("s1", Operation.PLAY, V, rec(("a1", "parcels"), restricted=True), NO),
        ("ad", Operation.PLAY, S, rec(("a1", "parcels"), restricted=True), NO),
        ("po", Operation.EXPORT, V, rec(("a1", "parcels"), restricted=True), NO),
        ("po", Operation.EXPORT, L, rec(("a1", "parcels"), restricted=True), OK),
        ("s1", Operation.GET, V, rec(("a1", "parcels"), restricted=True), OK),
        ("x9", Operation.SEARCH, V, None, WHO),  # not in the directory
    ],
)
def test_rules(
    person: str,
    op: Operation,
    purpose: Purpose,
    recording: RecordingFacts | None,
    expected: Verdict,
) -> None:
    assert verdict(person, op, purpose, recording) is expected


def test_supervisor_scope_is_reports_own_and_team() -> None:
    scope = scope_of(DIRECTORY.people["s1"], DIRECTORY)
    assert scope.employee_ids == {"s1", "a1", "a3", "a4"}
    assert scope.teams == {"parcels"} and not scope.everything
    assert scope_of(DIRECTORY.people["ad"], DIRECTORY).everything


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DSR-2026-0042", "DSR-2026-0042"),
        ("customer +358 40 123 4567 called", "customer [number removed] called"),
        ("call 040-1234567 on 2026-03-02 14:30", "call [number removed] on 2026-03-02 14:30"),
        ("tab\there", "tab here"),
    ],
)
def test_reasons_are_scrubbed_of_numbers(text: str, expected: str) -> None:
    assert scrub(text) == expected
