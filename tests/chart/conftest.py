"""Fixtures of the chart, image and GitOps tests.

Tests marked `tools` run the real helm, promtool and Node.js schema checks from the cache
scripts/fetch-tools.sh fills; without them the fixtures raise and the tests fail (they are
never skipped: `make test` fetches the tools first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chart_tools import Helm, find_node_modules, find_tool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "tools: needs helm, promtool and the Node.js schema checks (make tools)"
    )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """helm v3.18 with private config, cache and data folders."""
    return Helm(find_tool("helm"), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool 2.42."""
    return find_tool("promtool")


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The prometheus-operator schema packages and the TypeScript compiler."""
    return find_node_modules()
