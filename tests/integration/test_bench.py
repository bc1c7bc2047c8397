"""The benchmark keeps working: a tiny run end to end (figures are not judged here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stockflow.config import Settings
from stockflow.stack.ferretdb_patches import BUILD, WITHOUT_CAS

pytestmark = pytest.mark.timeout(600)

TOP_LEVEL = {
    "baseline_orders_per_s",
    "stockflow_orders_per_s",
    "speedup_vs_baseline",
    "slowest_ceiling_orders_per_s",
    "fraction_of_ceiling",
    "p99_ms_at_1000_per_s",
    "audit_discrepancies",
    "cas_patch_speedup_vs_baseline",
    "cas_patch_target_met",
}


def test_quick_benchmark_runs_every_contestant_and_audits(
    stack_settings: Settings, tmp_path: Path
) -> None:
    from bench.cas_section import missing_builds
    from bench.report import docs_table
    from bench.run import main

    missing = {b.tag for b in missing_builds(stack_settings)}
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
    _check_patch_section(results["cas_patch"], results["workloads"]["zipf"], missing)
    docs = tmp_path / "performance.md"
    docs_table(results, docs)
    assert "The FerretDB compare-and-set patch" in docs.read_text()
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_patch_section(patch: dict[str, Any], zipf: dict[str, Any], missing: set[str]) -> None:
    """Each FerretDB build in the cache ran both contestants on its private server.

    A quick run builds nothing: on a machine where only the local stack's build is cached
    (a fresh CI machine: `make test` builds BUILD, nothing builds WITHOUT_CAS), the section
    runs on BUILD alone and names WITHOUT_CAS as left out. It runs on both once
    `python -m bench.ferretdb_cas` or a full `make bench` has built WITHOUT_CAS.
    """
    assert patch["workload"]["orders"] == zipf["orders"]
    assert patch["target_met"] is None  # a quick run's tiny sizes are not judged
    assert set(patch["skipped"]) == missing
    assert set(patch["builds"]) == {WITHOUT_CAS.tag, BUILD.tag} - missing
    for tag, build in patch["builds"].items():
        assert build["audit_discrepancies"] == 0, tag
        assert build["outcomes"] == [zipf["orders"]], tag
        assert all(n > 0 for n in build["baseline_orders_processed"]), tag
        # Counted on the private FerretDB's own process: it did the work.
        assert build["servers_cpu_ms_per_order"]["stockflow"]["ferretdb"] > 0, tag
    if BUILD.tag in patch["builds"]:
        assert patch["micro"][BUILD.tag]["contended"]["lost"] == 0


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
