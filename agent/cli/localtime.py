"""Times on the command line as the person at the terminal reads and types them: in the
local time zone (``TZ``, else the system's ``/etc/localtime``), with the offset and the
zone's name shown, so a time copied into a ticket or a letter means one instant."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

LOCALTIME = Path("/etc/localtime")


def local_zone() -> dt.tzinfo:
    """``TZ`` when it names an IANA zone, else the zone /etc/localtime links to, else
    the C library's idea of local time (a fixed offset: the current one)."""
    for name in (os.environ.get("TZ", "").removeprefix(":"), _linked_zone()):
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    zone = dt.datetime.now().astimezone().tzinfo
    return zone if zone is not None else dt.UTC


def _linked_zone() -> str:
    try:
        target = str(LOCALTIME.resolve())
    except OSError:
        return ""
    _, found, name = target.partition("/zoneinfo/")
    return name if found else ""


def zone_name(zone: dt.tzinfo) -> str:
    return zone.key if isinstance(zone, ZoneInfo) else (zone.tzname(None) or "local")


def show(moment: dt.datetime, zone: dt.tzinfo | None = None, seconds: bool = True) -> str:
    """``2026-11-27 14:30:05 +02:00 EET``: local date and time, offset, abbreviation."""
    local = moment.astimezone(zone or local_zone())
    offset = local.strftime("%z")
    clock = "%H:%M:%S" if seconds else "%H:%M"
    return f"{local.strftime('%Y-%m-%d ' + clock)} {offset[:3]}:{offset[3:]} {local.tzname()}"


def parse(text: str, zone: dt.tzinfo | None = None) -> dt.datetime:
    """An ISO time; without an offset it is local time. ValueError if not ISO."""
    moment = dt.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone or local_zone())
    return moment
