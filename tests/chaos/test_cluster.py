"""Chaos on a private three-broker cluster: partition leaders killed with ``kill -9`` while
orders flow, restarted later; every acknowledged message gets one outcome, the books balance.

The cluster has its own state folder and ports (``cluster.py``), so killing its brokers never
touches the local stack other runs share. Sized by ``STOCKFLOW_CHAOS_SCALE`` (1: 20,000
orders and two kills).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.cluster import LeaderChange, kill_leader, private_cluster
from tests.chaos.harness import local_stack, run_chaos
from tests.chaos.test_chaos import check

SCALE = float(os.environ.get("STOCKFLOW_CHAOS_SCALE", "0.1"))
# Short version in make test: tests/integration/test_cluster.py (a cluster of its own each).
pytestmark = [pytest.mark.chaos, pytest.mark.full_size_only, pytest.mark.timeout(900)]


def test_partition_leaders_killed_mid_stream_lose_nothing(tmp_path: Path) -> None:
    orders = max(1000, int(20_000 * SCALE))
    shared = local_stack(breaks=False)  # MongoDB and Redis only are used; nothing is stopped
    changes: list[LeaderChange] = []
    with private_cluster(shared, tmp_path) as cluster:
        result = run_chaos(
            cluster.settings,
            "cluster-kill-leaders",
            orders=orders,
            products=200,
            workers=3,
            rate=max(30, orders / 60),  # a minute of orders
            faults=kill_leader(
                cluster, changes, after_messages=orders // 5, down_seconds=5, kills=2
            ),
            log_dir=tmp_path / "logs",
            timeout=600,
        )
    for change in changes:
        print(
            f"killed broker {change.victim}, new leader {change.new_leader} after "
            f"{change.failover_seconds:.1f}s\n  before: {change.before[0]}\n"
            f"  after: {change.after[0]}\n  restarted: {change.restarted[0]}"
        )
        assert change.new_leader not in (None, change.victim)
    assert len(changes) == 2
    check(result)
