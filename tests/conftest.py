"""Shared test configuration: integration tests are marked by folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Properties are about outcomes, not speed: hypothesis's per-example deadline (200 ms) fails them
# on a loaded 2-core machine (seen: the planner's crash property under load 15), so it is off.
settings.register_profile("stockflow", deadline=None)
settings.load_profile("stockflow")

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (HERE / "integration") in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
