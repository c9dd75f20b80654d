"""Speech for calls and energy measurements of what was recorded.

- :func:`make_speech` renders two clearly different utterances with espeak-ng and
  converts them with sox to 8 kHz mono 16-bit WAV (G.711's rate), ~7-8 s each;
  files that already exist in the target directory are reused, so a session-scoped
  fixture makes them once per test session.
- :func:`channel_rms` decodes any audio file with ffmpeg and returns the RMS energy
  of each channel; :func:`envelope` gives the per-window RMS of one channel and
  :func:`best_correlation` compares two envelopes allowing for a small time offset,
  which is how tests show that a recorded leg carries the speech sent on it.
"""

from __future__ import annotations

import array
import json
import math
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


def trim(source: Path, target: Path, seconds: float) -> Path:
    """The first ``seconds`` of a WAV file (e.g. a sender that falls silent early)."""
    subprocess.run(
        ["sox", str(source), str(target), "trim", "0", f"{seconds:.3f}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return target


def probe(path: Path) -> tuple[int, int, float]:
    """(channels, sample rate, duration in seconds) of an audio file."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=channels,sample_rate:format=duration",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    doc = json.loads(out)
    stream = doc["streams"][0]
    return int(stream["channels"]), int(stream["sample_rate"]), float(doc["format"]["duration"])


def decode(path: Path, rate: int = RATE) -> tuple[int, array.array[int]]:
    """(channels, interleaved signed 16-bit samples) of any audio file ffmpeg reads."""
    channels = probe(path)[0]
    pcm = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            str(path),
            "-f",
            "s16le",
            "-acodec",
            "pcm_s16le",
            "-ac",
            str(channels),
            "-ar",
            str(rate),
            "-",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    samples = array.array("h")
    samples.frombytes(pcm[: len(pcm) - len(pcm) % 2])
    return channels, samples


def _rms(values: array.array[int] | list[int]) -> float:
    if not values:
        return 0.0
    return math.sqrt(sum(v * v for v in values) / len(values))


def channel_rms(path: Path) -> list[float]:
    """RMS energy of each channel (full scale = 32768)."""
    channels, samples = decode(path)
    return [_rms(samples[c::channels]) for c in range(channels)]


def envelope(path: Path, channel: int = 0, window_ms: int = 20) -> list[float]:
    """RMS per window of one channel: the loudness contour of the speech."""
    channels, samples = decode(path)
    mono = samples[channel::channels]
    step = RATE * window_ms // 1000
    return [_rms(mono[i : i + step]) for i in range(0, len(mono) - step + 1, step)]


def _pearson(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    if n < 2:
        return 0.0
    a, b = a[:n], b[:n]
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / math.sqrt(var_a * var_b) if var_a and var_b else 0.0


def best_correlation(recorded: list[float], sent: list[float], max_lag: int = 100) -> float:
    """Highest correlation of ``sent`` with ``recorded`` shifted by 0..max_lag windows
    (the recording starts at the answer, the speech a little later: 100 windows of the
    default 20 ms are 2 s)."""
    return max(_pearson(recorded[lag:], sent) for lag in range(max_lag + 1))
