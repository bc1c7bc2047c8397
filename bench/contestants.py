"""The contestants of the benchmark: stockflow's worker and the seed's design, each measured.

Each runs on the settings it is given (topic, database, MongoDB server), so the same code
measures them on the local stack and on a private FerretDB (``cas_section.py``). ``servers``
says which servers' CPU to count: by default every local service's processes by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.baseline import run_baseline
from bench.consumer import consume_all
from bench.measure import Sampler
from stockflow.config import Settings
from stockflow.pipeline import open_pipeline

BASELINE_SECONDS = 45.0
"""The seed's design is slow: it runs this long on the first orders of a workload's topic."""
QUICK_BASELINE_SECONDS = 5.0
Servers = Mapping[str, Sequence[int]] | None
"""The servers whose CPU to count, by name: their pids (None: every local service by name)."""


def private_server(s: Settings) -> dict[str, str]:
    """The worker's MongoDB server when it is not the local stack's (a private FerretDB):
    the environment would otherwise name the shared one."""
    return {"MONGODB_URI": s.mongodb_uri.get_secret_value()} if s.mongodb_uri else {}


def measure_stockflow(
    s: Settings,
    expected: int,
    progress: Callable[[int], None],
    tmp: Path,
    servers: Servers = None,
) -> dict[str, Any]:
    """One worker through a pre-loaded topic: its rate, CPU, memory, and the audit."""
    run = consume_all(
        s,
        expected,
        progress=progress,
        log=tmp / f"{s.group_id}.log",
        stats_file=tmp / f"{s.group_id}.json",
        env=private_server(s),
        servers=servers,
    )
    usage = run.usage
    return {
        "orders_per_s": round(run.watch.orders_per_s, 1),
        "outcomes": run.watch.count,
        "statuses": run.watch.statuses,
        "cpu_s_per_1000": round(usage.cpu_s / expected * 1000, 3),
        "servers_cpu_s_per_1000": {
            k: round(v / expected * 1000, 3) for k, v in usage.servers_cpu_s.items()
        },
        "peak_rss_mb": round(usage.peak_rss_mb, 1),
        "rss_quartiles_mb": _quartiles(usage.rss_samples_mb),
        "audit_discrepancies": run.report.discrepancies,
        "audit_messages_checked": run.report.messages_checked,
        "applier_seconds": run.stats.get("applier_seconds", {}),
    }


def _quartiles(samples: list[float]) -> list[float]:
    """RSS at a quarter, half, three quarters and the end of the run."""
    if not samples:
        return []
    n = len(samples)
    return [samples[min(n - 1, n * q // 4)] for q in (1, 2, 3, 4)]


def measure_baseline(
    s: Settings, messages: int, seconds: float, servers: Servers = None
) -> dict[str, Any]:
    """The seed's design on the first orders of the topic for at most ``seconds``."""
    with open_pipeline(s) as pipeline:
        products = pipeline.inventory.products
        sampler = Sampler(os.getpid(), servers=servers)
        run = run_baseline(
            s, products, pipeline.redis,
            group_id=f"{s.group_id}-baseline", max_messages=messages, max_seconds=seconds,
        )  # fmt: skip
        usage = sampler.stop()
    return {
        "orders_per_s": round(run.orders_per_s, 1),
        "orders_processed": run.processed,
        "seconds": round(run.last_done - run.first_done, 1),
        "cpu_s_per_1000": round(usage.cpu_s / max(1, run.processed) * 1000, 3),
        "servers_cpu_s_per_1000": {
            k: round(v / max(1, run.processed) * 1000, 3) for k, v in usage.servers_cpu_s.items()
        },
        "errors": run.errors[:3],
    }
