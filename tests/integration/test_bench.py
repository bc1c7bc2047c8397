"""The benchmark keeps working: a tiny run end to end (figures are not judged here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stockflow.config import Settings

pytestmark = pytest.mark.timeout(600)

TOP_LEVEL = {
    "baseline_orders_per_s",
    "stockflow_orders_per_s",
    "speedup_vs_baseline",
    "slowest_ceiling_orders_per_s",
    "fraction_of_ceiling",
    "p99_ms_at_1000_per_s",
    "audit_discrepancies",
}


def test_quick_benchmark_runs_every_contestant_and_audits(
    stack_settings: Settings, tmp_path: Path
) -> None:
    from bench.run import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results) >= TOP_LEVEL
    assert results["audit_discrepancies"] == 0
    for name, workload in results["workloads"].items():
        sf = workload["stockflow"]
        assert sf["outcomes"] == workload["orders"], name
        assert sf["statuses"] == {"applied": workload["orders"]}, name
        assert sf["audit_messages_checked"] == workload["orders"], name
        assert workload["baseline"]["orders_processed"] > 0, name
        assert workload["ceilings"]["mongodb_aggregated_orders_per_s"] > 0, name
    for latency in results["latency"].values():
        assert latency["with_outcome"] == latency["orders"]
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_scaling_runs_each_worker_count_on_a_private_broker_and_audits(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """The worker part of ``bench.scaling``; its three-broker part (a cluster start and one
    more run, over a minute) runs only in ``make bench-scale``."""
    from bench.report import scaling_table
    from bench.scaling import main

    assert main(["--quick", "--no-replication", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "scaling.json").read_text())
    assert results["audit_discrepancies"] == 0
    assert results["workload"]["commands_partitions"] == 6
    runs = results["runs"]
    assert [(r["brokers"], r["workers"]) for r in runs] == [(1, 1), (1, 2), (1, 3)]
    for r in runs:
        n, label = r["orders"], f"{r['workers']} worker(s)"
        assert r["outcomes"] == n and r["statuses"] == {"applied": n}, label
        assert r["audit_messages_checked"] == n, label
        assert r["mongodb_concurrency"] == stack_settings.mongodb_concurrency, label
        cpu = r["cpu_ms_per_order"]
        # Every process of the pool was sampled, and the private broker, not the stack's.
        assert {f"worker {i}" for i in range(1, r["workers"] + 1)} <= set(cpu), (label, cpu)
        assert cpu["kafka"] > 0 and cpu["supervisor"] > 0, (label, cpu)
        assert {"ferretdb", "postgres", "redis", "reader", "other"} <= set(cpu), (label, cpu)
    assert f"| 3 ({stack_settings.mongodb_concurrency}) |" in scaling_table(results)
