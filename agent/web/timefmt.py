"""Times as people here read and type them: Finnish dates (27.11.2026 14:30) in the
viewer's time zone (Europe/Helsinki by default), shown with the UTC offset."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

_FINNISH = re.compile(
    r"^\s*(\d{1,2})\.(\d{1,2})\.(\d{4})(?:\s+(?:klo\s+)?(\d{1,2})[:.](\d{2}))?\s*$"
)


class TimeInputError(ValueError):
    """A date a person typed that is not ``pp.kk.vvvv [tt:mm]``."""


def parse_local(text: str, zone: ZoneInfo, end_of_day: bool = False) -> dt.datetime | None:
    """``"27.11.2026 14:30"`` (or a date alone: its start, or the next day's start with
    ``end_of_day``) in ``zone`` → an aware datetime; empty → None."""
    if not text.strip():
        return None
    match = _FINNISH.match(text)
    if match is None:
        raise TimeInputError(text)
    day, month, year, hour, minute = match.groups()
    try:
        value = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0))
    except ValueError:
        raise TimeInputError(text) from None
    if end_of_day and hour is None:
        value += dt.timedelta(days=1)
    return value.replace(tzinfo=zone)


def show(moment: dt.datetime, zone: ZoneInfo) -> str:
    """``27.11.2026 14:30:05 (UTC+02:00)``."""
    local = moment.astimezone(zone)
    offset = local.strftime("%z")
    return f"{local:%d.%m.%Y %H:%M:%S} (UTC{offset[:3]}:{offset[3:]})"


def show_date(moment: dt.datetime, zone: ZoneInfo) -> str:
    return f"{moment.astimezone(zone):%d.%m.%Y}"


def duration(ms: int) -> str:
    seconds = max(0, ms // 1000)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
