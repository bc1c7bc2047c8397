"""Shared test configuration: integration tests are marked by folder."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (HERE / "integration") in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
