"""Real scrapes turned into `promtool test rules` input series.

Promtool's clock starts at 0, so an absolute timestamp (a ``*_timestamp_seconds``
gauge) is shifted to the scrape's time: 0 on promtool's clock is the moment of the
scrape. Series last ``HOURS`` at one sample a minute: every sample keeps the scraped
value, except the ``*_last_*_timestamp_seconds`` gauges of a healthy daemon, which
advance with the clock (the sweeper keeps succeeding).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

HOURS = 6
STEPS = HOURS * 60
_ADVANCING = re.compile(r"_last_\w+_timestamp_seconds$")


@dataclass(frozen=True)
class Series:
    name: str
    labels: tuple[tuple[str, str], ...]
    values: str  # promtool's expanding notation, e.g. "0x360" or "-20+60x360"

    @property
    def selector(self) -> str:
        inside = ", ".join(f"{k}={json.dumps(v)}" for k, v in self.labels)
        return f"{self.name}{{{inside}}}"

    def label(self, key: str) -> str:
        return dict(self.labels).get(key, "")


def _number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def constant(value: float) -> str:
    return f"{_number(value)}x{STEPS}"


def ramp(start: float, per_minute: float) -> str:
    sign = "+" if per_minute >= 0 else "-"
    return f"{_number(start)}{sign}{_number(abs(per_minute))}x{STEPS}"


def series_from_scrape(text: str, job: str, instance: str, scraped_at: float) -> list[Series]:
    found = [Series("up", (("instance", instance), ("job", job)), constant(1))]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not math.isfinite(sample.value):
                continue
            labels = tuple(sorted({**sample.labels, "job": job, "instance": instance}.items()))
            value = sample.value
            if sample.name.endswith("_timestamp_seconds"):
                value -= scraped_at
            values = ramp(value, 60) if _ADVANCING.search(sample.name) else constant(value)
            found.append(Series(sample.name, labels, values))
    return found


def override(series: list[Series], name: str, values: str) -> list[Series]:
    """The same series with every ``name`` series given ``values`` (a fault)."""
    hit = [replace(s, values=values) if s.name == name else s for s in series]
    assert any(s.name == name for s in series), f"no series {name} in the real run"
    return hit


def alert_names(rules_file: Path) -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", rules_file.read_text(), re.M)


def rules_test(
    rules_file: Path,
    series: list[Series],
    checks: list[tuple[str, str, list[dict[str, dict[str, str]]]]],
) -> str:
    """A promtool test file (JSON is YAML): ``checks`` are (eval time, alert name,
    expected alerts with their labels and annotations)."""
    document = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s.selector, "values": s.values} for s in series],
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": expected}
                    for at, name, expected in checks
                ],
            }
        ],
    }
    return json.dumps(document, indent=1)


def run_promtool(test_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
