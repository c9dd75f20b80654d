"""Audio adapter: the one module that touches pydub (and through it ffmpeg).

Two mono legs become one stereo recording, customer left and employee right, encoded
for the archive. Problems are reported, never hidden: a silent channel (one-way
audio) or legs of very different length are flagged by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydub import AudioSegment

from agent.manifest import sha256_file

SILENCE_DBFS = -60.0
# Opus for speech (tests/bench/finalize_cost.py, 12 x 5 min stereo 8 kHz calls at 24k):
# complexity 5 and 60 ms frames take about half the CPU of the defaults (10, 20 ms)
# and give ~8 % smaller files; PESQ-NB of the decoded speech 4.20 against 4.28.
OPUS_PARAMETERS = ["-application", "voip", "-compression_level", "5", "-frame_duration", "60"]
ENCODERS: dict[str, tuple[str, str | None, list[str] | None]] = {
    # archive format -> (ffmpeg container, codec, extra parameters); WAV without
    # parameters is written by pydub itself (no ffmpeg process, no temporary file)
    "opus": ("ogg", "libopus", OPUS_PARAMETERS),
    "flac": ("flac", None, []),
    "wav": ("wav", None, None),
}


@dataclass(frozen=True)
class EncodedAudio:
    path: Path
    channels: int
    duration_ms: int
    size: int
    sha256: str
    silent_channels: tuple[int, ...]  # 0 = left (customer), 1 = right (employee)
    length_mismatch_ms: int


def _load(path: Path) -> AudioSegment:
    if path.stat().st_size <= 44:
        return AudioSegment.silent(duration=0, frame_rate=8000)
    return load(path)


def load(path: Path) -> AudioSegment:
    """Decode any audio file (pydub leaks the handle when given a path, so hand it one)."""
    with path.open("rb") as fh:
        return AudioSegment.from_file(fh, format=path.suffix.lstrip(".") or None)


def _is_silent(segment: AudioSegment) -> bool:
    return len(segment) == 0 or segment.rms == 0 or segment.dBFS < SILENCE_DBFS


def encode(legs: list[Path], out: Path, audio_format: str, bitrate: str) -> EncodedAudio:
    """Merge one (mixed) or two (customer, employee) mono legs and encode them to ``out``."""
    segments = [_load(p).set_channels(1) for p in legs]
    rate = max(s.frame_rate for s in segments)
    segments = [s.set_frame_rate(rate).set_sample_width(2) for s in segments]
    longest = max(len(s) for s in segments)
    mismatch = longest - min(len(s) for s in segments)
    padded = [
        s + AudioSegment.silent(duration=longest - len(s), frame_rate=rate)
        if len(s) < longest
        else s
        for s in segments
    ]
    # Padding can leave a frame or two of difference; cut to the shortest frame count.
    frames = min(int(s.frame_count()) for s in padded)
    padded = [s.get_sample_slice(0, frames) for s in padded]
    silent = tuple(i for i, s in enumerate(segments) if _is_silent(s))
    audio = padded[0] if len(padded) == 1 else AudioSegment.from_mono_audiosegments(*padded)
    container, codec, parameters = ENCODERS[audio_format]
    audio.export(
        out,
        format=container,
        codec=codec,
        bitrate=bitrate if codec == "libopus" else None,
        parameters=parameters,
    ).close()
    return EncodedAudio(
        path=out,
        channels=len(padded),
        duration_ms=len(audio),
        size=out.stat().st_size,
        sha256=sha256_file(out),
        silent_channels=silent,
        length_mismatch_ms=mismatch,
    )
