"""Speech for test calls: two clearly different utterances rendered with espeak-ng and
converted with sox to 8 kHz mono 16-bit WAV (G.711's rate), ~7-8 s each. Files that
already exist in the target directory are reused."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

RATE = 8000

CUSTOMER_TEXT = (
    "Hello, this is the customer calling. My parcel number is four two seven. "
    "It should have arrived on Monday, but nothing has come yet."
)
EMPLOYEE_TEXT = (
    "Good morning, parcels customer service, this is Aino speaking. "
    "Let me check that for you. One moment please."
)


@dataclass(frozen=True)
class Speech:
    customer: Path
    employee: Path


def _render(text: str, target: Path, voice: str, speed: int) -> None:
    raw = target.with_suffix(".raw.wav")
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        [
            "sox",
            str(raw),
            "-r",
            str(RATE),
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            str(target),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    raw.unlink()


def make_speech(directory: Path) -> Speech:
    """The customer's and the employee's utterance as 8 kHz mono 16-bit WAV files."""
    directory.mkdir(parents=True, exist_ok=True)
    speech = Speech(directory / "customer.wav", directory / "employee.wav")
    if not speech.customer.exists():
        _render(CUSTOMER_TEXT, speech.customer, "en-us", 180)
    if not speech.employee.exists():
        _render(EMPLOYEE_TEXT, speech.employee, "en-gb+f3", 165)
    return speech
