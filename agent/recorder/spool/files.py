"""What a PBX leaves in the spool, and how it is read: the sidecar (JSON) and WAV
files, converted into a capture's mono 16-bit legs; a redacted copy for quarantine.
Pure functions and streaming file I/O; the loop is in ``agent.recorder.spool.pickup``.

**Sidecar** (``<anything>.json`` beside the audio in the spool directory, UTF-8, ≤ 64 KiB)::

    {"version": 1,
     "call_id": "1719990000.42",              # the PBX's call id (required)
     "started_at": "2026-03-02T09:15:00Z",    # answer, UTC: ISO-8601 or epoch seconds
     "ended_at": 1719990312,                  # hang-up (optional: start + audio length)
     "direction": "inbound",                  # inbound | outbound | unknown (default)
     "customer": "040 123 4567",              # as the PBX has it; "anonymous" if withheld
     "service": "0100 5577",                  # the service line called / calling from
     "employee": "1001",                      # extension or SIP AoR (directory lookup)
     "audio": {"customer": "x-r.wav", "employee": "x-t.wav"}}   # MixMonitor r()/t() pair
    # or "audio": {"stereo": "x.wav", "customer_channel": "left"}  (or "right")
    # or "audio": {"mixed": "x.wav"}                               (one mono or mixed file)

Unknown keys are refused unless they start with ``x_``. Audio names are bare file
names in the spool directory itself (no ``/``, no leading ``.``, no symlinks). WAV
files: PCM 16-bit, A-law or µ-law, mono or stereo, any rate (kept native).

PCM 16-bit data is taken as little-endian (WAV's byte order and the hosts we run on).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import warnings
import wave
from collections.abc import Iterable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from agent.capture import CUSTOMER_LEG, EMPLOYEE_LEG, MIXED_LEG, Direction
from agent.privacy import Protector
from agent.recorder.spool.index import Stat
from agent.recorder.spool.pauses import PauseError, parse_pauses
from agent.redaction import redact_numbers

with warnings.catch_warnings():  # deprecated in 3.11, gone in 3.13 (pydub needs it too)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SIDECAR_SUFFIX = ".json"
AUDIO_SUFFIX = ".wav"
MAX_SIDECAR_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024
_WAV_CODECS = {1: 16, 6: 8, 7: 8}  # PCM, A-law, µ-law → required bits per sample
_KEYS = {"version", "call_id", "started_at", "ended_at", "direction", "customer"}
_KEYS |= {"service", "employee", "audio", "pauses"}


class SpoolError(ValueError):
    """Why a spool entry cannot be taken (its message never holds a sidecar value)."""


# ---------------------------------------------------------------- the sidecar


@dataclass(frozen=True)
class Sidecar:
    call_id: str
    started_at: dt.datetime
    ended_at: dt.datetime | None
    direction: Direction
    customer: str | None = field(repr=False)  # the raw number: memory only, never logged
    service: str | None
    employee: str | None
    layout: str  # "pair" | "stereo" | "mixed"
    files: tuple[str, ...]  # pair: (customer, employee); else one file
    customer_channel: int = 0  # stereo: 0 = left, 1 = right
    pauses: tuple[tuple[dt.datetime, dt.datetime], ...] = ()  # the PBX's own (spool.pauses)


def parse_sidecar(text: str) -> Sidecar:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpoolError(f"not JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise SpoolError("expected a JSON object")
    unknown = sorted(k for k in doc if k not in _KEYS and not str(k).startswith("x_"))
    if unknown:
        raise SpoolError(f"unknown key {unknown[0]!r}")
    if doc.get("version", 1) != 1:
        raise SpoolError("version: expected 1")
    call_id = _text(doc, "call_id")
    if call_id is None or len(call_id) > 256:
        raise SpoolError("call_id: required, a string of 1..256 characters")
    started = _time(doc, "started_at")
    if started is None:
        raise SpoolError("started_at: required")
    ended = _time(doc, "ended_at")
    if ended is not None and ended < started:
        raise SpoolError("ended_at: before started_at")
    try:
        direction = Direction(doc.get("direction") or "unknown")
    except ValueError:
        raise SpoolError("direction: expected inbound, outbound or unknown") from None
    layout, files, channel = _audio_spec(doc.get("audio"))
    try:
        pauses = parse_pauses(doc.get("pauses"), started, ended, _time)
    except PauseError as exc:
        raise SpoolError(str(exc)) from None
    return Sidecar(
        call_id,
        started,
        ended,
        direction,
        _text(doc, "customer"),
        _text(doc, "service"),
        _text(doc, "employee"),
        layout,
        files,
        channel,
        pauses,
    )


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise SpoolError(f"{key}: expected a string")
    return value


def _time(doc: dict[str, Any], key: str) -> dt.datetime | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    expected = f"{key}: expected an ISO-8601 UTC time or epoch seconds"
    try:
        if isinstance(value, bool):
            raise SpoolError(expected)
        if isinstance(value, int | float) or (
            isinstance(value, str) and value[:1].isdigit() and value.replace(".", "", 1).isdigit()
        ):
            moment = dt.datetime.fromtimestamp(float(value), dt.UTC)
        elif isinstance(value, str):
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        else:
            raise SpoolError(expected)
    except (ValueError, OverflowError, OSError):
        raise SpoolError(expected) from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    if moment.year < 2000:
        raise SpoolError(f"{key}: before the year 2000")
    return moment


def _audio_spec(audio: object) -> tuple[str, tuple[str, ...], int]:
    if not isinstance(audio, dict):
        raise SpoolError(
            'audio: expected {"customer": …, "employee": …}, {"stereo": …} or {"mixed": …}'
        )
    keys = set(audio)
    if keys == {"customer", "employee"}:
        return "pair", (_file_name(audio["customer"]), _file_name(audio["employee"])), 0
    if keys in ({"stereo"}, {"stereo", "customer_channel"}):
        side = audio.get("customer_channel", "left")
        if side not in ("left", "right"):
            raise SpoolError("audio.customer_channel: expected left or right")
        return "stereo", (_file_name(audio["stereo"]),), 0 if side == "left" else 1
    if keys == {"mixed"}:
        return "mixed", (_file_name(audio["mixed"]),), 0
    raise SpoolError("audio: expected customer+employee, stereo (+customer_channel) or mixed")


def _file_name(value: object) -> str:
    """A bare name inside the spool; anything that could point elsewhere is refused."""
    if not isinstance(value, str) or not value or len(value) > 255:
        raise SpoolError("audio: file names must be non-empty strings")
    if "/" in value or "\\" in value or "\0" in value or value.startswith("."):
        raise SpoolError("audio: file name escapes the spool (path separator or leading '.')")
    return value


# ---------------------------------------------------------------- WAV → mono legs


@dataclass(frozen=True)
class WavInfo:
    codec: int  # 1 PCM, 6 A-law, 7 µ-law
    channels: int
    rate: int
    data_offset: int
    data_bytes: int
    incomplete: bool  # the header's sizes were never written: data runs to end of file

    @property
    def block(self) -> int:
        return self.channels * (2 if self.codec == 1 else 1)


def read_wav_info(fh: BinaryIO, size: int) -> WavInfo:
    head = fh.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise SpoolError("not a RIFF/WAVE file (or truncated before its header)")
    fmt: tuple[int, int, int] | None = None
    pos = 12
    while True:
        chunk = fh.read(8)
        if len(chunk) < 8:
            raise SpoolError("truncated WAV: no data chunk")
        cid, clen = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        pos += 8
        if cid == b"data":
            break
        if clen > 1 << 16:
            raise SpoolError(f"WAV chunk {cid!r} of {clen} bytes before the data")
        body = fh.read(clen + (clen & 1))
        if len(body) < clen:
            raise SpoolError("truncated WAV: header cut short")
        if cid == b"fmt ":
            fmt = _wav_format(body)
        pos += len(body)
    if fmt is None:
        raise SpoolError("WAV has no fmt chunk before its data")
    codec, channels, rate = fmt
    block = channels * (2 if codec == 1 else 1)
    available = size - pos
    incomplete = clen in (0, 0xFFFFFFFF) and available > 0
    if clen > available and not incomplete:
        raise SpoolError(f"truncated WAV: header says {clen} data bytes, file has {available}")
    data = available if incomplete else clen
    return WavInfo(codec, channels, rate, pos, data - data % block, incomplete)


def _wav_format(body: bytes) -> tuple[int, int, int]:
    if len(body) < 16:
        raise SpoolError("WAV fmt chunk too short")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
    if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's tag
        tag = struct.unpack_from("<H", body, 24)[0]
    if _WAV_CODECS.get(tag) != bits:
        raise SpoolError(f"WAV format {tag} with {bits} bits: expected PCM 16, A-law or µ-law")
    if channels not in (1, 2) or not 4000 <= rate <= 96000:
        raise SpoolError(f"WAV with {channels} channels at {rate} Hz: expected 1-2, 4-96 kHz")
    return tag, channels, rate


@dataclass(frozen=True)
class Converted:
    legs: tuple[str, ...]
    sha256: str  # of the audio samples as delivered, all files in sidecar order
    duration_s: float
    incomplete: bool


def convert(spool: Path, car: Sidecar, out: Path) -> Converted:
    """Write the sidecar's audio as mono 16-bit legs into ``out``, streaming."""
    digest = hashlib.sha256()
    plan: list[tuple[str, list[tuple[str, int | None]]]]
    if car.layout == "pair":
        plan = [(car.files[0], [(CUSTOMER_LEG, None)]), (car.files[1], [(EMPLOYEE_LEG, None)])]
    elif car.layout == "stereo":
        cc = car.customer_channel
        plan = [(car.files[0], [(CUSTOMER_LEG, cc), (EMPLOYEE_LEG, 1 - cc)])]
    else:
        plan = [(car.files[0], [(MIXED_LEG, None)])]
    seconds, incomplete, data = 0.0, False, 0
    for name, legs in plan:
        info = _convert_file(spool / name, [(out / leg, ch) for leg, ch in legs], digest)
        if car.layout == "stereo" and info.channels != 2:
            raise SpoolError(f"{name}: a stereo layout needs 2 channels, the file has 1")
        seconds = max(seconds, info.data_bytes / info.block / info.rate)
        incomplete |= info.incomplete
        data += info.data_bytes
    if data == 0:
        raise SpoolError("no audio data in any file")
    legs_out = tuple(leg for _, legs in plan for leg, _ in legs)
    return Converted(legs_out, digest.hexdigest(), seconds, incomplete)


def open_regular(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpoolError(f"{path.name}: a symlink (escapes the spool)") from None
        raise
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise SpoolError(f"{path.name}: not a regular file")
    return fh


def _convert_file(
    src: Path, outputs: list[tuple[Path, int | None]], digest: hashlib._Hash
) -> WavInfo:
    with ExitStack() as stack:
        fh = stack.enter_context(open_regular(src))
        info = read_wav_info(fh, os.fstat(fh.fileno()).st_size)
        fh.seek(info.data_offset)
        writers = [stack.enter_context(wave.open(str(path), "wb")) for path, _ in outputs]
        for w in writers:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(info.rate)
        left = info.data_bytes
        step = CHUNK_BYTES - CHUNK_BYTES % info.block
        while left > 0:
            raw = fh.read(min(step, left))
            if not raw:
                raise SpoolError(f"{src.name}: shrank while being read")
            left -= len(raw)
            digest.update(raw)
            pcm = _linear(raw, info.codec)
            for w, (_, channel) in zip(writers, outputs, strict=True):
                w.writeframesraw(_mono(pcm, info.channels, channel))
    for path, _ in outputs:
        with path.open("rb") as out:
            os.fsync(out.fileno())
    return info


def _linear(raw: bytes, codec: int) -> bytes:
    if codec == 6:
        return audioop.alaw2lin(raw, 2)
    if codec == 7:
        return audioop.ulaw2lin(raw, 2)
    return raw


def _mono(pcm: bytes, channels: int, channel: int | None) -> bytes:
    if channels == 1:
        return pcm
    if channel is None:
        return audioop.tomono(pcm, 2, 0.5, 0.5)
    return audioop.tomono(pcm, 2, 1.0 - channel, float(channel))


# ---------------------------------------------------------------- quarantine


def redacted_sidecar(text: str, protector: Protector) -> str:
    """The sidecar as we may keep it: the customer masked, other digit runs redacted."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return redact_numbers(text[:MAX_SIDECAR_BYTES])
    if not isinstance(doc, dict):
        return redact_numbers(json.dumps(doc))
    raw = doc.get("customer")
    masked = protector.protect(raw if isinstance(raw, str) else None).masked
    doc = _redact(doc)
    if "customer" in doc:
        doc["customer"] = masked
    return json.dumps(doc, indent=1, sort_keys=True)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_numbers(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > 99999:
        return redact_numbers(str(value))
    if isinstance(value, dict):
        return {redact_numbers(str(k)): _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def quarantine_copy(
    spool: Path,
    quarantine_dir: Path,
    reason: str,
    sidecar: str | None,
    audio: Iterable[str],
    protector: Protector,
) -> str:
    """Copy what we were given into a fresh quarantine entry; the originals stay."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    entry = f"spool-{stamp}-{secrets.token_hex(3)}"
    target = quarantine_dir / entry
    target.mkdir(parents=True)
    lines = [f"reason: {redact_numbers(reason)}", f"spool: {spool}"]
    if sidecar is not None:
        with suppress(OSError, SpoolError), open_regular(spool / sidecar) as fh:
            text = fh.read(MAX_SIDECAR_BYTES + 1).decode("utf-8", "replace")
            (target / "sidecar.redacted.json").write_text(redacted_sidecar(text, protector))
        lines.append(f"sidecar: {redact_numbers(sidecar)}")
    for i, name in enumerate(audio, 1):
        copy = target / f"audio-{i}{AUDIO_SUFFIX}"
        try:
            with open_regular(spool / name) as src, copy.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
            lines.append(f"{copy.name}: copy of {redact_numbers(name)}")
        except (OSError, SpoolError) as exc:
            copy.unlink(missing_ok=True)
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            lines.append(f"{copy.name}: not copied ({redact_numbers(f'{name}: {why}')})")
    lines.append("the original files were left in the spool")
    (quarantine_dir / f"{entry}.reason").write_text("\n".join(lines) + "\n")
    return entry


def read_sidecar(path: Path) -> Sidecar:
    with open_regular(path) as fh:
        raw = fh.read(MAX_SIDECAR_BYTES + 1)
    if len(raw) > MAX_SIDECAR_BYTES:
        raise SpoolError(f"sidecar larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        return parse_sidecar(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SpoolError("sidecar is not UTF-8") from None


class SpoolChanged(OSError):
    """A file changed while it was converted: it is still being written, look again."""


def call_ref(call_id: str) -> str:
    """A stable, non-reversible reference to the PBX's call id (as for SIP Call-IDs)."""
    return hashlib.sha256(call_id.encode()).hexdigest()[:16]


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def stat_key(name: str, st: os.stat_result) -> Stat:
    return (name, st.st_mtime_ns, st.st_size)


def current_keys(root: Path, keys: list[Stat]) -> list[Stat]:
    current: list[Stat] = []
    for name, _, _ in keys:
        st = lstat_or_none(root / name)
        current.append(stat_key(name, st) if st is not None else (name, -1, -1))
    return current
