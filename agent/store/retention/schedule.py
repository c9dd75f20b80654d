"""Retention arithmetic: calendar months counted from the end of the call, in UTC.

A recording that ended at ``e`` expires at ``add_months(e, n)``: the same day of the
month and time of day ``n`` months later, clamped to the month's last day when that day
does not exist (31 August + 6 months = 28 February, or 29 in a leap year). Pure
functions; the sweeper turns ``expired_ranges`` into one indexed SQL condition.

Clamping makes expiry non-monotonic across month ends (28 Aug 10:00 expires after
30 Aug 08:00 does), so the expired set at an instant is not one prefix of end times but
a prefix plus up to three single-day slices; ``expired_ranges`` returns exactly that.
"""

from __future__ import annotations

import calendar
import datetime as dt

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_DAY_MS = 86_400_000


def ms_to_datetime(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=ms)


def datetime_to_ms(moment: dt.datetime) -> int:
    return (moment.astimezone(dt.UTC) - EPOCH) // _MS


def add_months_date(day: dt.date, months: int) -> dt.date:
    year, month0 = divmod(day.month - 1 + months, 12)
    year += day.year
    last = calendar.monthrange(year, month0 + 1)[1]
    return dt.date(year, month0 + 1, min(day.day, last))


def add_months(moment: dt.datetime, months: int) -> dt.datetime:
    """Calendar months with month-end clamping; the time of day is kept."""
    day = add_months_date(moment.date(), months)
    return moment.replace(year=day.year, month=day.month, day=day.day)


def expires_at_ms(ended_at_ms: int, months: int) -> int:
    return datetime_to_ms(add_months(ms_to_datetime(ended_at_ms), months))


def is_expired(ended_at_ms: int, now_ms: int, months: int) -> bool:
    return expires_at_ms(ended_at_ms, months) <= now_ms


def expired_ranges(now_ms: int, months: int) -> list[tuple[int | None, int]]:
    """Inclusive ``(low, high)`` bounds of end times (ms) expired at ``now_ms``; a low
    of None is unbounded. ``is_expired(e, now)`` holds exactly when ``e`` is in one."""
    now = ms_to_datetime(now_ms)
    today = now.date()
    time_of_day_ms = now_ms - datetime_to_ms(dt.datetime.combine(today, dt.time(), dt.UTC))
    guess = add_months_date(today, -months)
    window = [guess + dt.timedelta(days=d) for d in range(-5, 6)]
    # add_months_date is monotonic in the day, so the days whose expiry day is before
    # today form a prefix, and the days expiring today lie between it and the rest.
    before = [d for d in window if add_months_date(d, months) < today]
    on_today = [d for d in window if add_months_date(d, months) == today]
    ranges: list[tuple[int | None, int]] = []
    if before:
        last = datetime_to_ms(dt.datetime.combine(before[-1], dt.time(), dt.UTC))
        ranges.append((None, last + _DAY_MS - 1))
    for day in on_today:
        start = datetime_to_ms(dt.datetime.combine(day, dt.time(), dt.UTC))
        ranges.append((start, start + time_of_day_ms))
    return ranges
