"""Energy measurements of what was recorded (speech itself: agent.testcall.speech).

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
from pathlib import Path

from agent.testcall.speech import RATE, Speech, make_speech

__all__ = ["RATE", "Speech", "make_speech"]


def trim(source: Path, target: Path, seconds: float) -> Path:
    """The first ``seconds`` of a WAV file (e.g. a sender that falls silent early)."""
    subprocess.run(
        ["sox", str(source), str(target), "trim", "0", f"{seconds:.3f}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return target


def long_speech(directory: Path, seconds: int) -> Speech:
    """The test speech repeated to last a whole call (the sender plays a file once)."""
    speech = make_speech(directory)
    looped = []
    for path in (speech.customer, speech.employee):
        target = path.with_name(f"long-{path.name}")
        times = str(seconds // 7 + 1)
        subprocess.run(["sox", str(path), str(target), "repeat", times], check=True, timeout=60)
        looped.append(target)
    return Speech(*looped)


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


# How closely a recorded channel must follow the speech sent on it, and by how much
# more than the other party's. Measured: 0.95+ on a quiet host, down to ~0.75 at load
# average 19 (jitter-buffer drops shift the contour); a swapped or empty channel scores
# under 0.45 against its own speech.
CARRIES_AT_LEAST = 0.6
CARRIES_MARGIN = 0.2


def carry_scores(path: Path, channel: int, sent: Path, other: Path) -> tuple[float, float]:
    """Correlation of the channel's loudness contour with ``sent`` and with ``other``."""
    recorded = envelope(path, channel)
    return best_correlation(recorded, envelope(sent)), best_correlation(recorded, envelope(other))


def carries(path: Path, channel: int, sent: Path, other: Path) -> bool:
    """The channel's loudness contour follows ``sent``, not ``other``."""
    mine, theirs = carry_scores(path, channel, sent, other)
    return mine > CARRIES_AT_LEAST and mine > theirs + CARRIES_MARGIN
