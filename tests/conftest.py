from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.monitoring_run import monitoring_run  # noqa: F401 (one real run, shared)
from tests.support.stack import InProcessStore, Keys, make_keys, store_config


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InProcessStore]:
    with InProcessStore(store_config(tmp_path)) as running:
        yield running
