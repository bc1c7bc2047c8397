"""The contestants of the benchmark: stockflow's worker and the seed's design, each measured.

Each runs on the settings it is given (topic, database, MongoDB server), so the same code
measures them on the local stack and on a private FerretDB (``cas_section.py``). ``servers``
says which servers' CPU to count: by default every local service's processes by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.baseline import run_baseline
from bench.measure import Sampler, server_cpu, watch_outcomes
from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.pipeline import open_pipeline
from stockflow.worker import ensure_topics

BASELINE_SECONDS = 45.0
"""The seed's design is slow: it runs this long on the first orders of a workload's topic."""
QUICK_BASELINE_SECONDS = 5.0
ServerCpu = Callable[[], dict[str, float]]
"""CPU seconds used so far by each server to count, by name."""


def worker_env(s: Settings) -> dict[str, str]:
    """The worker's environment: this run's pipeline, on the MongoDB server it names."""
    env = {**os.environ, **s.worker_environment()}
    if s.mongodb_uri is not None:  # a private server (the environment names the shared one)
        env["MONGODB_URI"] = s.mongodb_uri.get_secret_value()
    return env


class StockflowProcess:
    """``stockflow consume`` (one worker, as users run it) with its CPU and memory sampled."""

    def __init__(self, s: Settings, stats_file: Path, servers: ServerCpu = server_cpu) -> None:
        ensure_topics(s)
        self.stats_file = stats_file
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stockflow", "consume", "--quiet", "--no-supervise",
             "--stats-file", str(stats_file)],
            env=worker_env(s),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.sampler = Sampler(self.proc.pid, servers=servers)

    def failed(self) -> str | None:
        """Why the worker is gone, if it exited (the benchmark then stops waiting for it)."""
        code = self.proc.poll()
        if code is None:
            return None
        stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        return f"stockflow consume exited with status {code}:\n{stderr[-2000:]}"

    def stop(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stop it (SIGTERM); its resource usage and the timings it wrote at exit."""
        usage = self.sampler.stop()
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, stderr = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"stockflow consume failed:\n{stderr.decode()[-2000:]}")
        stats = json.loads(self.stats_file.read_text()) if self.stats_file.exists() else {}
        return vars(usage), stats


def measure_stockflow(
    s: Settings,
    expected: int,
    progress: Callable[[int], None],
    tmp: Path,
    servers: ServerCpu = server_cpu,
) -> dict[str, Any]:
    """One worker through a pre-loaded topic: its rate, CPU, memory, and the audit."""
    worker = StockflowProcess(s, tmp / f"{s.group_id}.json", servers)
    try:
        watch = watch_outcomes(
            s, expected, timeout=1800, on_progress=progress, failed=worker.failed
        )
    finally:
        usage, stats = worker.stop()
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
    return {
        "orders_per_s": round(watch.orders_per_s, 1),
        "outcomes": watch.count,
        "statuses": watch.statuses,
        "cpu_s_per_1000": round(usage["cpu_s"] / expected * 1000, 3),
        "servers_cpu_s_per_1000": {
            k: round(v / expected * 1000, 3) for k, v in usage["servers_cpu_s"].items()
        },
        "peak_rss_mb": round(usage["peak_rss_mb"], 1),
        "rss_quartiles_mb": _quartiles(usage["rss_samples_mb"]),
        "audit_discrepancies": report.discrepancies,
        "audit_messages_checked": report.messages_checked,
        "applier_seconds": stats.get("applier_seconds", {}),
    }


def _quartiles(samples: list[float]) -> list[float]:
    """RSS at a quarter, half, three quarters and the end of the run."""
    if not samples:
        return []
    n = len(samples)
    return [samples[min(n - 1, n * q // 4)] for q in (1, 2, 3, 4)]


def measure_baseline(
    s: Settings, messages: int, seconds: float, servers: ServerCpu = server_cpu
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
