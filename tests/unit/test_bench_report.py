"""The benchmarks' generated doc sections: replaced in place, the prose around them kept."""

from __future__ import annotations

from pathlib import Path

from bench.report import SCALING_END, SCALING_START, scaling_docs

MACHINE = {"cpu": "x", "cores": 2, "memory_gib": 4, "system": "Linux", "python": "3.11"}


def _run(brokers: int, workers: int, rate: float) -> dict[str, object]:
    ms = {f"worker {i}": 0.1 for i in range(1, workers + 1)}
    ms |= {"supervisor": 0.01, "ferretdb": 0.2, "postgres": 0.15, "redis": 0.01}
    ms |= {"reader": 0.02, "other": 0.05}
    ms |= {"kafka": 0.02} if brokers == 1 else {f"kafka-{i}": 0.03 for i in (1, 2, 3)}
    return {
        "brokers": brokers, "workers": workers, "mongodb_concurrency": 8,
        "replication_factor": min(3, brokers), "min_insync_replicas": 2 if brokers == 3 else 1,
        "orders_per_s": rate, "orders_per_s_from_start": rate / 2,
        "cpu_ms_per_order": ms, "cores_busy": {k: v * 5 for k, v in ms.items()},
        "machine_cores_busy": 1.9, "audit_discrepancies": 0,
    }  # fmt: skip


RESULTS = {
    "machine": MACHINE, "quick": False, "seconds": 600, "kafka_heap": "512m",
    "workload": {"orders": 100_000, "products": 10_000, "zipf_s": 1.1, "input_partitions": 6,
                 "commands_partitions": 6},
    "brokers": {"1": {"start_seconds": 5.0, "rss_mb_after": {"1": 350}},
                "3": {"start_seconds": 12.0, "rss_mb_after": {"1": 350, "2": 360, "3": 340}}},
    "runs": [_run(1, 1, 5000.0), _run(1, 2, 5500.0), _run(1, 3, 5200.0), _run(3, 1, 4000.0)],
}  # fmt: skip


def test_the_generated_section_is_replaced_and_the_prose_kept(tmp_path: Path) -> None:
    doc = tmp_path / "scaling.md"
    doc.write_text(f"# Scaling\n\nbefore\n\n{SCALING_START}\nold figures\n{SCALING_END}\n\nafter\n")
    scaling_docs(RESULTS, doc)
    once = doc.read_text()
    scaling_docs(RESULTS, doc)
    assert doc.read_text() == once  # rewriting is idempotent
    head, _, rest = once.partition(SCALING_START)
    body, _, tail = rest.partition(SCALING_END)
    assert head == "# Scaling\n\nbefore\n\n" and tail == "\n\nafter\n"
    assert "old figures" not in body
    lines = body.splitlines()
    assert any(line.startswith("| 1 (8) | 5,000 | 2,500 | 1.00x |") for line in lines)
    assert any(line.startswith("| 3 (8) | 5,200 | 2,600 | 1.04x |") for line in lines)
    # One broker against three: Kafka's CPU per order summed over the brokers, each shown.
    assert any(
        line.startswith("| 3 | 3 / 2 | 1 | 4,000 | 0.80x | 0.090 (0.030 + 0.030 + 0.030) |")
        for line in lines
    ), body


def test_a_doc_without_markers_gets_them_at_its_end(tmp_path: Path) -> None:
    doc = tmp_path / "scaling.md"
    doc.write_text("# Scaling\n\nprose\n")
    scaling_docs(RESULTS, doc)
    text = doc.read_text()
    assert text.startswith("# Scaling\n\nprose\n\n" + SCALING_START)
    assert text.rstrip().endswith(SCALING_END)
