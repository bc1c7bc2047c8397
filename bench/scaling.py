"""Scaling on one machine: worker processes, and the cost of replication (docs/scaling.md).

In one run, on the same generated Zipf workload (``bench.workload``: 100,000 orders over 10,000
products by default, s = 1.1, six input partitions, six commands partitions):

- **workers**: ``stockflow consume --workers N`` for N = 1, 2, 3 on a private one-broker Kafka;
- **replication**: the same workload on a private three-broker cluster (replication 3,
  ``min.insync.replicas`` 2), beside the one-broker run with as many workers.

Both Kafkas are private (own state folder, free ports, the local stack's JVM heap), brought up
and down inside the run one at a time, so the local stack's Kafka is never touched and no
other client's traffic is counted; MongoDB (FerretDB) and Redis are the local stack's, used
under each run's own database and cache prefix. During every run the CPU seconds of each
process are sampled -- each worker, the supervisor, each broker, FerretDB, PostgreSQL, Redis,
the outcome reader -- with the machine's busy time, whose remainder is ``other``; after every
run the audit checks the books.

Every worker sends ``STOCKFLOW_MONGODB_CONCURRENCY`` (8) MongoDB commands side by side
(``--mongodb-concurrency`` to change): the local FerretDB build holds one pooled connection
per command (docs/ferretdb-backends.md, the pool deadlock patch), so three workers need 24.

Usage: ``python -m bench.scaling [--quick] [--write-docs] [--orders N] [--products N]
[--workers 1,2,3] [--replication-workers N] [--mongodb-concurrency N] [--no-replication]``
(``make bench-scale``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import ConfigResource
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.consumer import consume_all
from bench.measure import machine, stack_servers
from bench.workload import (
    PARTITIONS,
    Workload,
    delete_run_topics,
    drop,
    isolated,
    preload,
    seed_products,
)
from stockflow.config import Settings, load_settings
from stockflow.stack import Stack
from stockflow.testing import PrivateKafka, private_kafka
from stockflow.topics import admin_client, describe_topic

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    orders: int = 100_000
    products: int = 10_000
    workers: tuple[int, ...] = (1, 2, 3)
    replication_workers: int = 1
    """Worker processes of the three-broker run (and of the one-broker run it is set against)."""
    replication: bool = True
    quick: bool = False
    mongodb_concurrency: int | None = None
    """MongoDB commands side by side in each worker; None: the settings' (8 by default)."""

    @property
    def workload(self) -> Workload:
        return Workload("zipf", self.orders, self.products)


QUICK = {"orders": 2_000, "products": 500}


def run(plan: Plan, logs: Path) -> dict[str, Any]:
    """Every measurement of ``plan``, one private Kafka at a time; workers' output in ``logs``."""
    base = load_settings()
    Stack(base).up()
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine(),
        "quick": plan.quick,
        "services": {st.name: st.version for st in Stack(base).status()},
        "workload": {
            "orders": plan.orders,
            "products": plan.products,
            "popularity": "zipf",
            "zipf_s": plan.workload.zipf_s,
            "input_partitions": PARTITIONS,
            "commands_partitions": PARTITIONS,
        },
        "kafka_heap": base.kafka_heap,
        "brokers": {},
        "runs": [],
    }
    orders = plan.workload.orders_list(prefix="scale-")
    servers = {k: v for k, v in stack_servers(base).items() if not k.startswith("kafka")}
    layouts = [(1, sorted({*plan.workers, *([plan.replication_workers] * plan.replication)}))]
    if plan.replication:
        layouts.append((3, [plan.replication_workers]))
    progress = Progress(
        TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    with progress, tempfile.TemporaryDirectory(prefix="stockflow-scaling-") as tmp:
        for brokers, worker_counts in layouts:
            task = progress.add_task(f"{brokers} broker(s): starting", total=None)
            with private_kafka(base, Path(tmp) / f"kafka-{brokers}", brokers=brokers) as kafka:
                progress.update(task, description=f"{brokers} broker(s): up", total=1, completed=1)
                results["brokers"][str(brokers)] = {"start_seconds": round(kafka.start_seconds, 1)}
                for workers in worker_counts:
                    result = measure(kafka, servers, plan, orders, workers, progress, logs)
                    results["runs"].append(result)
                    console.print(f"[bold]{brokers} broker(s), {workers} worker(s)[/bold]: "
                                  f"{json.dumps(brief(result))}")  # fmt: skip
                results["brokers"][str(brokers)]["rss_mb_after"] = kafka.rss_mb()
    results["seconds"] = round(time.monotonic() - started)
    results["audit_discrepancies"] = sum(r["audit_discrepancies"] for r in results["runs"])
    return results


def measure(
    kafka: PrivateKafka,
    servers: Mapping[str, Sequence[int]],
    plan: Plan,
    orders: Sequence[Any],
    workers: int,
    progress: Progress,
    logs: Path,
) -> dict[str, Any]:
    """One run: preload the orders, seed the catalogue, run ``workers`` worker processes until
    every order has an outcome, audit; the run's topics and database are then deleted."""
    brokers = kafka.settings.kafka_brokers
    label = f"{brokers} broker(s), {workers} worker(s)"
    concurrency = plan.mongodb_concurrency or kafka.settings.mongodb_concurrency
    s = isolated(kafka.settings, f"b{brokers}w{workers}", mongodb_concurrency=concurrency)
    phases: dict[str, float] = {}
    clock = time.monotonic()
    task = progress.add_task(f"{label}: preloading", total=len(orders))
    try:
        preload(s, list(orders))
        phases["preload"] = time.monotonic() - clock
        clock = time.monotonic()
        seed_products(s, plan.products)
        phases["seed"] = time.monotonic() - clock
        progress.update(task, description=f"{label}: consuming")
        run = consume_all(
            s,
            len(orders),
            progress=lambda n: progress.advance(task, n),
            log=logs / f"{s.group_id}.log",
            workers=workers,
            env={
                **kafka.environment(),
                "STOCKFLOW_MONGODB_CONCURRENCY": str(concurrency),
            },
            servers={**servers, **{name: [pid] for name, pid in kafka.pids().items()}},
            timeout=120 + len(orders) / 100,  # 1,000 s for 100,000 orders: 100/s at least
        )
        phases.update(consume=run.usage.seconds, stop=run.stop_seconds, audit=run.audit_seconds)
        replication, min_isr = topic_replication(s, s.commands_topic)
    finally:
        clock = time.monotonic()
        drop(s)
        delete_run_topics(s)
        phases["cleanup"] = time.monotonic() - clock
    usage = run.usage
    cpu = {**usage.processes_cpu_s, **usage.servers_cpu_s, "reader": usage.own_cpu_s}
    cpu["other"] = max(0.0, usage.machine_busy_s - sum(cpu.values()))
    n = len(orders)
    return {
        "brokers": brokers,
        "workers": workers,
        "mongodb_concurrency": concurrency,
        "replication_factor": replication,
        "min_insync_replicas": min_isr,
        "orders": n,
        "orders_per_s": round(run.watch.orders_per_s, 1),
        "orders_per_s_from_start": round(run.orders_per_s_from_start, 1),
        "outcomes": run.watch.count,
        "statuses": run.watch.statuses,
        "seconds": round(usage.seconds, 1),
        "cpu_ms_per_order": {k: round(v / n * 1000, 4) for k, v in cpu.items()},
        "cores_busy": {k: round(v / usage.seconds, 2) for k, v in cpu.items()},
        "machine_cores_busy": round(usage.machine_busy_s / usage.seconds, 2),
        "peak_rss_mb": round(usage.peak_rss_mb, 1),
        "audit_discrepancies": run.report.discrepancies,
        "audit_messages_checked": run.report.messages_checked,
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
    }


def topic_replication(s: Settings, topic: str) -> tuple[int, int]:
    """(copies of each partition, ``min.insync.replicas``) of ``topic`` as Kafka reports them."""
    copies = min(len(p.replicas) for p in describe_topic(s, topic).partitions)
    resource = ConfigResource("topic", topic)
    admin = admin_client(s)  # kept alive until the future is done
    config = admin.describe_configs([resource], request_timeout=30)[resource].result()
    return copies, int(config["min.insync.replicas"].value)


def brief(r: dict[str, Any]) -> dict[str, Any]:
    """A run's headline: rate, machine load, the three busiest processes, the audit."""
    busiest = sorted(r["cores_busy"].items(), key=lambda kv: -kv[1])[:3]
    return {
        "orders_per_s": r["orders_per_s"],
        "machine_cores_busy": r["machine_cores_busy"],
        "busiest_cores": dict(busiest),
        "audit_discrepancies": r["audit_discrepancies"],
    }


def _counts(text: str) -> tuple[int, ...]:
    values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("worker counts are positive integers, e.g. 1,2,3")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"A small run ({QUICK['orders']:,} orders over "
        f"{QUICK['products']:,} products) to check the benchmark works.",
    )
    parser.add_argument("--orders", type=int, help="Orders per run [default: 100,000].")
    parser.add_argument("--products", type=int, help="Products [default: 10,000].")
    parser.add_argument(
        "--workers",
        type=_counts,
        default=(1, 2, 3),
        help="Worker processes to try on one broker [default: 1,2,3].",
    )
    parser.add_argument(
        "--replication-workers",
        type=int,
        default=1,
        help="Worker processes of the one- vs three-broker runs [default: 1].",
    )
    parser.add_argument(
        "--mongodb-concurrency",
        type=int,
        help="MongoDB commands side by side in each worker [default: "
        "STOCKFLOW_MONGODB_CONCURRENCY, 8].",
    )
    parser.add_argument("--no-replication", action="store_true", help="Skip the three-broker run.")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="Where scaling.json goes [default: bench/results].",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="Also rewrite the figures section of docs/scaling.md.",
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else {}
    plan = Plan(
        orders=args.orders or size.get("orders", Plan.orders),
        products=args.products or size.get("products", Plan.products),
        workers=args.workers,
        replication_workers=args.replication_workers,
        replication=not args.no_replication,
        quick=args.quick,
        mongodb_concurrency=args.mongodb_concurrency,
    )
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="stockflow-scaling-logs-"))
    console.print(f"workers' output: {logs}")
    # SIGTERM unwinds like Ctrl-C, so a private Kafka is brought down all the same.
    previous = signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    try:
        results = run(plan, logs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = args.out / "scaling.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    from bench.report import scaling_docs

    if args.write_docs:
        scaling_docs(results, ROOT / "docs" / "scaling.md")
    console.print(f"wrote {out} ({results['seconds']} s)")
    return 0 if results["audit_discrepancies"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
