"""The PBX's own pauses in a spool sidecar (``"pauses"``), and the silence the agent
writes over them in the capture's legs (whether or not the PBX already did).

    "pauses": [{"start": "2026-03-02T09:15:10Z", "end": 1772442920}]

Times as ``started_at``/``ended_at`` (ISO-8601 UTC or epoch seconds), in order, within
the call; at most ``MAX_PAUSES``. Stored as pauses asked for by ``"pbx"``.
"""

from __future__ import annotations

import datetime as dt
import struct
from pathlib import Path

from agent.capture import Pause, iso_ms

MAX_PAUSES = 64
PBX = "pbx"
_ZEROS = bytes(64 * 1024)


class PauseError(ValueError):
    """The sidecar's pauses are malformed (the message names what)."""


def parse_pauses(
    value: object,
    started: dt.datetime,
    ended: dt.datetime | None,
    read_time: object,
) -> tuple[tuple[dt.datetime, dt.datetime], ...]:
    """``read_time(doc, key)`` reads one time as the sidecar's other times are read."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PAUSES:
        raise PauseError(f"pauses: expected a list of at most {MAX_PAUSES} {{start, end}}")
    found: list[tuple[dt.datetime, dt.datetime]] = []
    before = started
    for item in value:
        if not isinstance(item, dict) or set(item) != {"start", "end"}:
            raise PauseError('pauses: each is {"start": time, "end": time}')
        start, end = read_time(item, "start"), read_time(item, "end")  # type: ignore[operator]
        if not isinstance(start, dt.datetime) or not isinstance(end, dt.datetime):
            raise PauseError("pauses: each needs a start and an end")
        if not before <= start <= end or (ended is not None and end > ended):
            raise PauseError("pauses: expected in order, within the call")
        found.append((start, end))
        before = end
    return tuple(found)


def as_pauses(pauses: tuple[tuple[dt.datetime, dt.datetime], ...]) -> tuple[Pause, ...]:
    return tuple(Pause(iso_ms(start), iso_ms(end), PBX) for start, end in pauses)


def silence(
    leg: Path, started: dt.datetime, pauses: tuple[tuple[dt.datetime, dt.datetime], ...]
) -> None:
    """Overwrite the leg's samples inside each pause with zeros, in place (a mono 16-bit
    WAV with the canonical 44-byte header, as the spool's conversion writes it)."""
    with leg.open("r+b") as fh:
        header = fh.read(44)
        if header[:4] != b"RIFF" or header[36:40] != b"data":
            raise ValueError(f"{leg.name}: not a canonical WAV")
        rate = struct.unpack_from("<I", header, 24)[0]
        data = struct.unpack_from("<I", header, 40)[0]
        for start, end in pauses:
            first = int((start - started).total_seconds() * rate) * 2
            last = min(data, int((end - started).total_seconds() * rate) * 2)
            position = first
            fh.seek(44 + position)
            while position < last:
                block = _ZEROS[: last - position]
                fh.write(block)
                position += len(block)
