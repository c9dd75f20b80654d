"""Prometheus alert rules (``callrec-alerts.yml``) and a Grafana dashboard
(``callrec-dashboard.json``) for the agent's and the store's /metrics, shipped as
package data; ``files()`` finds them in an installed callrec."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

RULES = "callrec-alerts.yml"
DASHBOARD = "callrec-dashboard.json"


def files() -> dict[str, Traversable]:
    here = resources.files(__name__)
    return {name: here / name for name in (RULES, DASHBOARD)}
