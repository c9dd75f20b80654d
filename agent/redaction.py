"""Redaction of possible phone numbers from free text: log values, quarantine notes,
redacted sidecars, audited reasons. One function, :func:`redact_numbers`, for all.

What is a possible phone number (replaced):

- a run of digits with an international prefix (``+``, URL-encoded ``%2B``, or ``00``)
  that :mod:`phonenumbers` accepts as a possible number, or that holds 7 or more digits
  (an unknown country code or an over-long run may still carry a number);
- any other run of 7 or more digits (a national number, or one with its country
  code but no ``+``: ``358401234567``);
- digits may be split by single spaces, dashes or a bracketed trunk prefix
  (``040 123 4567``, ``+358-40-123-4567``, ``+358 (0)40 123 4567``), and a run counts
  wherever it stands: next to letters, underscores or ``%2B`` (``call_0401234567.wav``,
  ``cid0401234567``, ``sip:%2B358401234567@pbx``).

What is kept, because it is something else:

- lower-case hexadecimal tokens of 16, 32, 40 or 64 characters with at least one
  letter (``call_ref``, recording ids, SHA-1/SHA-256 digests; one random 32-hex id in
  seven has a run of nine or more decimal digits) and UUIDs. A number glued into such
  a token (``0a00358401234567``) is taken for an id: the one form kept on purpose;
- masked numbers as :func:`agent.privacy.mask` writes them (``+358401234***``: a
  ``+``, digits and three stars);
- case references: an UPPER-case prefix of 2 to 5 letters glued to digits, optionally
  with dashes, not followed by more digit groups (``SR0012345678``, ``INC-20260042``,
  ``DSR-2026-0042``; ``AA040-123 4567`` is a number). A lower- or mixed-case prefix
  (``cid0401234567``, ``call0401234567``) is not a reference;
- ISO dates and times (also compact: ``20261202T030425``), IPv4 addresses, and
  values named for what they are:
  ``status=171140``, ``code=``, ``port=``, ``pid=``, ``bytes=``, ``size=``,
  ``offset=``, ``errno=``, ``len=``, or followed by a unit (``1048576 bytes``, ``MiB``);
- anything shorter than 7 digits (ports, pjsip status codes, counts).
"""

from __future__ import annotations

import re

import phonenumbers

REDACTED = "<redacted>"
MIN_DIGITS = 7  # the shortest national number with its area code

_HEX_ID = "|".join(f"[0-9a-f]{{{n}}}" for n in (64, 40, 32, 16))  # digests, ids, call_ref
_NOT_ALNUM_BEFORE = r"(?<![0-9A-Za-z])"
_NOT_ALNUM_AFTER = r"(?![0-9A-Za-z])"
_KEPT = "|".join(
    (
        # hex ids and digests (at least one letter), UUIDs
        rf"{_NOT_ALNUM_BEFORE}(?=[0-9]*[a-f])(?:{_HEX_ID}){_NOT_ALNUM_AFTER}",
        rf"{_NOT_ALNUM_BEFORE}[0-9A-Fa-f]{{8}}(?:-[0-9A-Fa-f]{{4}}){{3}}-[0-9A-Fa-f]{{12}}",
        # masked numbers
        r"(?<![\d+])\+\d{3,14}\*\*\*",
        # case references
        rf"{_NOT_ALNUM_BEFORE}[A-Z]{{2,5}}(?:-?\d+)+{_NOT_ALNUM_AFTER}(?![ \-]?\(?\d)",
        # ISO dates and times, IPv4 addresses
        r"(?<![\d+-])(?:19|20)\d\d-[01]\d-[0-3]\d(?:[T ][0-2]\d:\d\d(?::\d\d(?:[.,]\d+)?)?)?(?!\d)",
        r"(?<![\d+])(?:19|20)\d\d[01]\d[0-3]\dT[0-2]\d\d\d(?:\d\d(?:[.,]\d+)?)?(?!\d)",
        r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5}(?:-\d{1,5})?)?(?![\d.])",
        # values named for what they are, or followed by a unit
        r"(?<![0-9A-Za-z])(?:status|code|port|pid|bytes|size|offset|errno|len)[=:] ?\d+",
        rf"\d+ ?(?:bytes|KiB|MiB|GiB|kB|MB|GB){_NOT_ALNUM_AFTER}",
    )
)
_CANDIDATE = r"(?P<number>(?:\+|%2[Bb])?\d(?:(?:[ \-]|[ \-]?\(\d{1,3}\)[ \-]?)?\d)*)"
_SCAN = re.compile(f"(?:{_KEPT})|{_CANDIDATE}")
_DIGIT = re.compile(r"\d")
_FEWEST_DIGITS = 6  # the shortest possible number with its country code (phonenumbers)


def redact_numbers(text: str, replacement: str = REDACTED) -> str:
    """``text`` with every possible phone number replaced (see the module doc)."""
    if len(_DIGIT.findall(text)) < _FEWEST_DIGITS:  # most log values: nothing to scan
        return text
    return _SCAN.sub(lambda match: _replace(match, replacement), text)


def _replace(match: re.Match[str], replacement: str) -> str:
    number = match.group("number")
    if number is None or not is_possible_number(number):
        return match.group()
    return replacement


def is_possible_number(run: str) -> bool:
    """Whether a run of digits (as :func:`redact_numbers` finds them) could be a phone
    number."""
    international = run.startswith(("+", "%2B", "%2b"))
    digits = re.sub(r"\D", "", run.removeprefix("%2B").removeprefix("%2b"))
    if digits.startswith("00"):
        international, digits = True, digits[2:]
    if len(digits) >= MIN_DIGITS:
        return True  # whatever a country code or length rule says: it may hold one
    if not international:
        return False
    try:  # a short international number: whether its country has such numbers
        return bool(phonenumbers.is_possible_number(phonenumbers.parse("+" + digits)))
    except phonenumbers.NumberParseException:
        return False
