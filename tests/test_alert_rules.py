"""The shipped alert rules and dashboard against series from a real run
(tests/support/monitoring_run.py): `promtool test rules` finds the healthy run quiet
and each synthetic fault firing its alert; every metric the rules and the dashboard
name exists in the real scrapes."""

# The real run (monitoring_run) is a session fixture: tests/conftest.py.

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent import monitoring
from tests.support.monitoring_run import Run
from tests.support.promtool import (
    Series,
    alert_names,
    constant,
    override,
    ramp,
    rules_test,
    run_promtool,
    series_from_scrape,
)

# promtool comes from Debian's prometheus package (.ci/setup); no skip without it.
pytestmark = pytest.mark.sip

RULES = Path(str(monitoring.files()[monitoring.RULES]))
DASHBOARD = Path(str(monitoring.files()[monitoring.DASHBOARD]))
AGENT, STORE = "agent.example:9464", "store.example:9465"


@pytest.fixture
def run(monitoring_run: Run) -> Run:
    return monitoring_run


def healthy(run: Run) -> list[Series]:
    return [
        *series_from_scrape(run.scrapes["agent"], "callrec-agent", AGENT, run.scraped_at["agent"]),
        *series_from_scrape(run.scrapes["store"], "callrec-store", STORE, run.scraped_at["store"]),
    ]


def _rules() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for group in document["groups"] for r in group["rules"]}


def expected(alert: str, **labels: str) -> dict[str, dict[str, str]]:
    """The alert as promtool must report it: its labels and rendered annotations
    (the templates use only ``$labels``)."""
    rule = _rules()[alert]

    def render(text: str) -> str:
        return re.sub(r"{{ \$labels\.(\w+) }}", lambda m: labels[m.group(1)], text)

    return {
        "exp_labels": {**labels, **rule["labels"]},
        "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()},
    }


def promtool(tmp_path: Path, series: list[Series], checks: list[Any]) -> None:
    test_file = tmp_path / "test.yml"
    test_file.write_text(rules_test(RULES, series, checks))
    result = run_promtool(test_file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(alert_names(RULES)) == len(_rules()) >= 12


def test_the_healthy_run_fires_nothing(run: Run, tmp_path: Path) -> None:
    checks: list[Any] = [
        (at, name, []) for at in ("5m", "1h", "5h59m") for name in alert_names(RULES)
    ]
    promtool(tmp_path, healthy(run), checks)


AGENT_JOB = {"instance": AGENT, "job": "callrec-agent"}
STORE_JOB = {"instance": STORE, "job": "callrec-store"}

BOTH = [AGENT_JOB, STORE_JOB]

FAULTS: dict[str, tuple[str, str, str, str, list[dict[str, str]]]] = {
    # fault: (metric, its values, eval time, alert, the labels of each alert it fires)
    "sweeper frozen": (
        "callrec_sweeper_last_success_timestamp_seconds",
        constant(-30),
        "3h30m",
        "CallrecSweeperNotRun",
        [STORE_JOB],
    ),
    "sweeper failing": (
        "callrec_sweeper_failures_total",
        ramp(0, 1),
        "30m",
        "CallrecSweeperFailures",
        [STORE_JOB],
    ),
    "recording overdue": (
        "callrec_store_past_retention_max_seconds",
        ramp(0, 60),
        "3h30m",
        "CallrecRecordingsPastRetention",
        [STORE_JOB],
    ),
    "outbox stuck": (
        "callrec_outbox_oldest_seconds",
        ramp(0, 60),
        "1h30m",
        "CallrecOutboxStuck",
        [AGENT_JOB],
    ),
    "outbox over its limit": (
        "callrec_outbox_over_limit",
        constant(1),
        "30m",
        "CallrecOutboxGrowing",
        [AGENT_JOB],
    ),
    "worker down": ("callrec_workers_up", constant(1), "10m", "CallrecWorkersDown", [AGENT_JOB]),
    "quarantine": (
        "callrec_quarantine_entries",
        constant(3),
        "10m",
        "CallrecQuarantineNotEmpty",
        [AGENT_JOB],
    ),
    # Both daemons ran on this host's disk and both are scraped: both alert.
    "disk": ("callrec_data_dir_free_bytes", constant(1_000_000), "20m", "CallrecDiskLow", BOTH),
    "not scraped": ("up", constant(0), "10m", "CallrecDown", BOTH),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_fires_its_alert(run: Run, tmp_path: Path, fault: str) -> None:
    metric, values, at, alert, fired = FAULTS[fault]
    series = override(healthy(run), metric, values)
    alerts = [expected(alert, **labels) for labels in fired]
    # Quiet at the start (a "for" not yet lasted, or nothing yet), firing later.
    promtool(tmp_path, series, [("0m", alert, []), (at, alert, alerts)])


def test_certificate_expiring_and_uploads_failing_fire(run: Run, tmp_path: Path) -> None:
    """Faults of labelled series: a client certificate 10 days from its end, and an
    agent that only retries for half an hour (the store unreachable)."""
    series = [s for s in healthy(run) if s.name != "callrec_uploads_total"]
    cert = {**AGENT_JOB, "role": "client"}
    series.append(
        Series(
            "callrec_tls_certificate_not_after_timestamp_seconds",
            tuple(sorted(cert.items())),
            constant(10 * 86400),
        )
    )
    for outcome, values in (("receipt_ok", constant(5)), ("retry", ramp(0, 2))):
        labels = tuple(sorted({**AGENT_JOB, "outcome": outcome}.items()))
        series.append(Series("callrec_uploads_total", labels, values))
    promtool(
        tmp_path,
        series,
        [
            ("1h", "CallrecCertificateExpiring", [expected("CallrecCertificateExpiring", **cert)]),
            ("1h", "CallrecCertificateExpiresSoon", []),
            ("10m", "CallrecUploadFailures", []),
            ("1h", "CallrecUploadFailures", [expected("CallrecUploadFailures", instance=AGENT)]),
        ],
    )


# ---------------------------------------------------------------- names that exist

_NOT_METRICS = {
    "by", "on", "without", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le", "time", "rate", "increase", "deriv", "sum", "histogram_quantile",
    "label_values", "instance", "job", "role", "outcome", "reason", "code", "source",
    "party", "status", "key_id", "operation",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Names of metrics in a PromQL expression: identifiers that are not functions,
    keywords, label names (inside braces or by/on lists), or strings."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", bare))
    return {n for n in names if n not in _NOT_METRICS and not re.fullmatch(r"\d+[smhd]?", n)}


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def scraped_names(run: Run) -> set[str]:
    """Sample names of the scrapes, and those of families declared without samples
    yet (a labelled counter has none until its first event: no INVITE was refused)."""
    names = {"up"}
    for text in run.scrapes.values():
        for family in text_string_to_metric_families(text):
            names.update(sample.name for sample in family.samples)
            names.update(family.name + end for end in _SUFFIXES.get(family.type, ()))
    return names


def dashboard_queries() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in document["panels"] for t in p.get("targets", [])]
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_every_dashboard_query_names_metrics_of_the_real_run(run: Run) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    known = scraped_names(run)
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= known, f"{query!r} names {sorted(names - known)}: not in any scrape"


def test_every_alert_names_metrics_of_the_real_run(run: Run) -> None:
    known = scraped_names(run)
    for alert, rule in _rules().items():
        names = metric_names(rule["expr"])
        assert names, alert
        assert names <= known, f"{alert} names {sorted(names - known)}: not in any scrape"


def test_metric_name_extraction() -> None:
    assert metric_names(
        'sum by (instance, le) (rate(callrec_finalize_seconds_bucket{job="a", le="1"}[5m]))'
    ) == {"callrec_finalize_seconds_bucket"}
    assert metric_names("time() - callrec_x > 2 * callrec_y + 3600") == {"callrec_x", "callrec_y"}
    assert metric_names('label_values(callrec_z{job="callrec-agent"}, instance)') == {"callrec_z"}
