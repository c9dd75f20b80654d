"""Listing commands' machine-readable output (``--json``, ``--csv``) and the progress
line of long transfers.

``--json`` writes one JSON array of objects, ``--csv`` a header row then one row per
item; the field names are each command's stable contract (scripts depend on them).
In CSV a list is joined with ``;``, true/false are written so, a missing value is empty.
The progress line goes to stderr only when stderr is a terminal: nothing when piped,
redirected or run by cron.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TextIO, TypeVar

Row = Mapping[str, object]
_T = TypeVar("_T")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--json", dest="output", action="store_const", const="json", help="a JSON array"
    )
    group.add_argument(
        "--csv", dest="output", action="store_const", const="csv", help="CSV with a header"
    )
    parser.set_defaults(output="text")


def emit(output: str, fields: Sequence[str], rows: Sequence[Row], lines: Sequence[str]) -> None:
    """Write ``rows`` (each with ``fields``) as ``output`` json or csv, else ``lines``."""
    stream = sys.stdout
    if output == "json":
        items = [{name: row[name] for name in fields} for row in rows]
        stream.write(json.dumps(items, ensure_ascii=False, indent=1) + "\n")
    elif output == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_cell(row[name]) for name in fields])
    else:
        stream.writelines(line + "\n" for line in lines)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ";".join(str(v) for v in value)
    return str(value)


def note(output: str, line: str) -> None:
    """A remark beside the listing: stdout in text, stderr when stdout is data."""
    (sys.stdout if output == "text" else sys.stderr).write(line + "\n")


# ---------------------------------------------------------------- progress


def size_text(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


class Progress:
    """``label: 1.2 MiB / 3.4 MiB  35%`` redrawn in place on a terminal's stderr, at
    most every ``interval_s``; silent when stderr is not a terminal."""

    def __init__(
        self, label: str, total: int | None, stream: TextIO | None = None, interval_s: float = 0.2
    ) -> None:
        self.stream = stream or sys.stderr
        self.active = self.stream.isatty()
        self.label, self.total, self.interval_s = label, total, interval_s
        self.done, self._drawn_at = 0, 0.0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.active and now - self._drawn_at >= self.interval_s:
            self._draw()
            self._drawn_at = now

    def finish(self) -> None:
        if self.active:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        line = f"{self.label}: {size_text(self.done)}"
        if self.total:
            line += f" / {size_text(self.total)}  {min(100, self.done * 100 // self.total)}%"
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()


def counted(items: Iterable[_T], progress: Progress, size: Callable[[_T], int]) -> Iterator[_T]:
    """``items`` unchanged, their ``size`` counted on ``progress``, whose line is ended
    when they end or fail (an error then starts on a line of its own)."""
    try:
        for item in items:
            progress.add(size(item))
            yield item
    finally:
        progress.finish()


def total_of(call: object, key: str = "callrec-total-bytes") -> int | None:
    """The total a streaming call's initial metadata announces (the store sends it)."""
    initial = getattr(call, "initial_metadata", None)
    if initial is None:
        return None
    for name, value in initial() or ():
        if name == key and str(value).isdigit():
            return int(value)
    return None
