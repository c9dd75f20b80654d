"""The directory of people: who works here, their SIP identities, role, team and training.

One TOML file of ``[[person]]`` tables, validated as a whole: a broken file never
replaces a good one.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from agent import logs

log = logs.get_logger(__name__)


class Role(StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"
    PRIVACY_OFFICER = "privacy_officer"


class DirectoryError(ValueError):
    """The directory file cannot be used; the message names the person and field."""


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    role: Role
    team: str | None
    supervisor: str | None
    aors: tuple[str, ...]
    trained: dt.date | None


def aor_keys(aor: str) -> tuple[str, ...]:
    """The forms under which a SIP identity is matched: ``user@host`` and ``user``.

    ``"Aino" <sip:1001@pbx.example;transport=udp>`` → ``("1001@pbx.example", "1001")``.
    """
    value = aor.strip()
    if "<" in value and ">" in value:
        value = value[value.index("<") + 1 : value.rindex(">")]
    value = unquote(value).strip()
    scheme, sep, rest = value.partition(":")
    if sep and scheme.lower() in ("sip", "sips", "tel"):
        value = rest
    value = value.split(";", 1)[0].split("?", 1)[0].lower()
    user = value.split("@", 1)[0]
    return (value, user) if user != value else (value,)


@dataclass(frozen=True)
class Directory:
    people: Mapping[str, Person]
    by_aor: Mapping[str, Person]

    @classmethod
    def load(cls, path: Path) -> Directory:
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise DirectoryError(f"{path}: directory file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise DirectoryError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(doc, str(path))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "directory") -> Directory:
        entries = doc.get("person", [])
        if not isinstance(entries, list):
            raise DirectoryError(f"{source}: expected [[person]] tables")
        people: dict[str, Person] = {}
        by_aor: dict[str, Person] = {}
        for index, entry in enumerate(entries):
            person = _person(entry, f"{source}: person #{index + 1}")
            if person.id in people:
                raise DirectoryError(f"{source}: person id {person.id!r} appears twice")
            people[person.id] = person
            for aor in person.aors:
                for key in aor_keys(aor):
                    other = by_aor.get(key)
                    if other is not None and other.id != person.id:
                        raise DirectoryError(
                            f"{source}: SIP identity {aor!r} belongs to both "
                            f"{other.id!r} and {person.id!r}"
                        )
                    by_aor[key] = person
        for person in people.values():
            if person.supervisor is not None and person.supervisor not in people:
                raise DirectoryError(
                    f"{source}: person {person.id!r}: supervisor {person.supervisor!r} "
                    "is not in the directory"
                )
        return cls(people, by_aor)

    def find_by_aor(self, aor: str) -> Person | None:
        for key in aor_keys(aor):
            if (person := self.by_aor.get(key)) is not None:
                return person
        return None


# Ids the catalog gives meaning to: "unknown" is the employee of an untagged call.
RESERVED_IDS = frozenset({"unknown"})
_PERSON_ID = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def _person(entry: object, where: str) -> Person:
    if not isinstance(entry, dict):
        raise DirectoryError(f"{where}: expected a table")

    def text(key: str, required: bool = True) -> str | None:
        value = entry.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise DirectoryError(f"{where}: {key} = {value!r}: expected a non-empty string")
        return value.strip()

    unknown = set(entry) - {"id", "name", "role", "team", "supervisor", "aors", "trained"}
    if unknown:
        raise DirectoryError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    person_id = text("id")
    assert person_id is not None
    if not _PERSON_ID.fullmatch(person_id) or person_id.lower() in RESERVED_IDS:
        raise DirectoryError(
            f"{where}: id = {person_id[:80]!r}: expected 1..64 letters, digits or . _ @ - "
            f"other than {', '.join(sorted(RESERVED_IDS))} (the catalog's untagged employee)"
        )
    where = f"{where} ({person_id})"
    role_raw = text("role") or ""
    try:
        role = Role(role_raw)
    except ValueError:
        raise DirectoryError(
            f"{where}: role = {role_raw!r}: expected one of {', '.join(r.value for r in Role)}"
        ) from None
    aors = entry.get("aors", [])
    if not isinstance(aors, list) or not all(isinstance(a, str) and a for a in aors):
        raise DirectoryError(f"{where}: aors = {aors!r}: expected a list of SIP identities")
    trained = entry.get("trained")
    if trained is not None and not isinstance(trained, dt.date):
        raise DirectoryError(f"{where}: trained = {trained!r}: expected a date like 2026-01-31")
    for key, limit in (("name", 200), ("team", 64), ("supervisor", 64)):
        value = entry.get(key)
        if isinstance(value, str) and len(value.strip()) > limit:
            raise DirectoryError(f"{where}: {key}: longer than {limit} characters")
    return Person(
        id=person_id,
        name=text("name") or "",
        role=role,
        team=text("team", required=False),
        supervisor=text("supervisor", required=False),
        aors=tuple(aors),
        trained=trained,
    )


class LiveDirectory:
    """The current directory, swapped atomically on a good reload; a bad reload keeps
    the old one and says why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._current = Directory.load(path)
        self.version = 0  # counts reloads that changed something

    @property
    def current(self) -> Directory:
        with self._lock:
            return self._current

    def reload(self) -> bool:
        try:
            fresh = Directory.load(self.path)
        except DirectoryError as exc:
            log.error("directory_reload_failed", reason=str(exc), kept="previous")
            return False
        with self._lock:
            unchanged, self._current = fresh == self._current, fresh
            self.version += 0 if unchanged else 1
        if unchanged:  # saved again with the same content
            log.debug("directory_unchanged", people=len(fresh.people))
        else:
            log.info("directory_reloaded", people=len(fresh.people))
        return True
