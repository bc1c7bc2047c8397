"""stockflow's benchmark: the seed's per-message design, stockflow, and the services' ceilings.

Side by side in one run, on the same stack and the same generated workloads (see
docs/performance.md for the figures and how to read them):

- throughput on pre-loaded topics: 200,000 orders over 10,000 products with Zipf popularity
  (s = 1.1), the same with uniform popularity, and one hot product; each contestant gets its
  own copy of the catalogue (every product starts with the same stock);
- latency at fixed offered rates (1,000/s, 5,000/s and half of stockflow's Zipf maximum): from
  an order's creation to its outcome being readable on the outcomes topic;
- how throughput and memory move with batch size, product count and stream length;
- the FerretDB compare-and-set patch (``cas_section.py``): the Zipf workload run by stockflow
  and the seed's design on private FerretDBs built without and with the patch, side by side;
- after every stockflow run, the audit (a fast wrong answer does not count).

The baseline is slow (milliseconds per order), so it runs on the first orders of the same
topic for a bounded time; its rate is orders per second all the same.

Usage: ``python -m bench.run [--quick] [--no-patch-section] [--out DIR] [--write-docs]``
(``make bench``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import cas_section, ceilings
from bench.consumer import StockflowProcess
from bench.contestants import (
    BASELINE_SECONDS,
    QUICK_BASELINE_SECONDS,
    measure_baseline,
    measure_stockflow,
)
from bench.measure import machine, percentile, watch_outcomes
from bench.workload import (
    Workload,
    delete_run_topics,
    drop,
    headline_workload,
    isolated,
    preload,
    scaled,
    seed_products,
)
from stockflow.audit import run_audit
from stockflow.config import Settings, load_settings
from stockflow.pipeline import open_pipeline
from stockflow.producer import OrderProducer
from stockflow.stack import Stack
from stockflow.topics import create_topic

ROOT = Path(__file__).resolve().parent.parent
WARMUP_SECONDS = 2.0
"""Latency runs offer this long before timing starts (first fetches, partitions joining
transactions); those orders are processed and audited but not timed."""
console = Console(stderr=True)


# --- runs ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, base: Settings, *, quick: bool, out: Path) -> None:
        self.base = base
        self.quick = quick
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix="stockflow-bench-"))
        """Workers' --stats-file outputs and logs."""
        self.progress = Progress(
            TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        )  # fmt: skip

    def scale(self, n: int) -> int:
        return scaled(n, self.quick)

    def throughput(self, workload: Workload, *, baseline: bool, ceilings_too: bool,
                   batch_size: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Preload the workload once; run each contestant on its own copy of the catalogue."""
        orders = workload.orders_list(prefix=f"{workload.name}-")
        label = workload.name + (f"-b{batch_size}" if batch_size else "")
        topic = isolated(self.base, label)
        task = self.progress.add_task(f"{label}: preloading", total=len(orders))
        preload(topic, orders)
        self.progress.update(task, completed=len(orders))
        result: dict[str, Any] = {
            "orders": workload.orders, "products": workload.products,
            "popularity": workload.popularity,
        }  # fmt: skip
        runs: list[Settings] = []
        try:
            s = self._contestant(topic, "sf", workload, batch_size)
            runs.append(s)
            task = self.progress.add_task(f"{label}: stockflow", total=len(orders))
            result["stockflow"] = measure_stockflow(
                s, len(orders), lambda n: self.progress.advance(task, n), self.tmp
            )
            if baseline:
                s = self._contestant(topic, "seed", workload, batch_size)
                runs.append(s)
                console.print(f"{label}: baseline (the seed's design) …")
                result["baseline"] = measure_baseline(
                    s,
                    messages=len(orders),
                    seconds=QUICK_BASELINE_SECONDS if self.quick else BASELINE_SECONDS,
                )
            if ceilings_too:
                console.print(f"{label}: ceilings …")
                result["ceilings"] = {
                    "kafka_consume_orders_per_s": round(ceilings.kafka_consume(topic, len(orders))),
                }
                s = self._contestant(topic, "agg", workload, batch_size)
                runs.append(s)
                result["ceilings"]["mongodb_aggregated_orders_per_s"] = round(
                    ceilings.mongodb_aggregated(s, orders)
                )
                s = self._contestant(topic, "per", workload, batch_size)
                runs.append(s)
                sample = orders[: self.scale(20_000)]
                result["ceilings"]["mongodb_per_order_orders_per_s"] = round(
                    ceilings.mongodb_per_order(s, sample)
                )
        finally:
            for s in runs:
                drop(s)
            delete_run_topics(topic)
        self.say(label, result)
        return result

    def _contestant(self, topic: Settings, who: str, workload: Workload,
                    batch_size: int | None) -> Settings:  # fmt: skip
        s = isolated(self.base, who).model_copy(update={"topic": topic.topic})
        if batch_size:
            s = s.model_copy(update={"batch_size": batch_size})
        seed_products(s, workload.products)
        return s

    def latency(self, rate: float, seconds: float, products: int) -> dict[str, Any]:
        """Offer ``rate`` orders/s for ``seconds`` to a warm worker; creation → outcome."""
        s = isolated(self.base, f"lat{int(rate)}")
        create_topic(s, s.topic, partitions=6)
        seed_products(s, products)
        worker = StockflowProcess(
            s, log=self.tmp / f"{s.group_id}.log", stats_file=self.tmp / f"{s.group_id}.json"
        )
        try:
            warmup = int(rate * WARMUP_SECONDS)
            workload = Workload("lat", int(rate * seconds) + 1 + warmup, products, seed=int(rate))
            orders = workload.orders_list(prefix=f"lat{int(rate)}-")
            sent: dict[str, float] = {}
            with OrderProducer(s) as producer:
                producer.send(orders[0])  # warm-up: wait for its outcome before timing
                producer.flush()
                warm = watch_outcomes(s, 1, timeout=120, failed=worker.failed)
                if warm.count != 1:
                    raise RuntimeError("the worker did not answer the warm-up order")
                results: list[Any] = []
                reader = threading.Thread(
                    target=lambda: results.append(
                        watch_outcomes(s, len(orders), timeout=seconds + 120, failed=worker.failed)
                    )
                )
                reader.start()
                started = time.perf_counter()
                for i, order in enumerate(orders[1:], start=1):
                    due = started + i / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    if i > warmup:  # the first second only brings the pipeline up to speed
                        sent[str(order.order_id)] = time.time()
                    producer.send(order)
                offered = (len(orders) - 1) / (time.perf_counter() - started)
                producer.flush()
                reader.join()
            watch = results[0]
        finally:
            usage, stats = worker.stop()
        latencies = [(watch.arrivals[i] - t) * 1000 for i, t in sent.items() if i in watch.arrivals]
        # The two halves: until the outcome is durable in MongoDB (routing, the commands'
        # transaction, the applier's queue and work), and from there until a reader sees it
        # (the applier's transaction and the delivery).
        durable = [(watch.decided[i] - t) * 1000 for i, t in sent.items() if i in watch.decided]
        seen = [(watch.arrivals[i] - watch.decided[i]) * 1000 for i in sent if i in watch.decided]
        with open_pipeline(s) as pipeline:
            report = run_audit(s, pipeline)
        drop(s)
        delete_run_topics(s)
        result = {
            "offered_per_s": round(offered, 1),
            "orders": len(sent),
            "with_outcome": len(latencies),
            "p50_ms": round(percentile(latencies, 50), 1),
            "p95_ms": round(percentile(latencies, 95), 1),
            "p99_ms": round(percentile(latencies, 99), 1),
            "max_ms": round(max(latencies, default=0.0), 1),
            "until_durable_ms": {f"p{q}": round(percentile(durable, q), 1) for q in (50, 99)},
            "durable_to_seen_ms": {f"p{q}": round(percentile(seen, q), 1) for q in (50, 99)},
            "peak_rss_mb": round(usage.peak_rss_mb, 1),
            "audit_discrepancies": report.discrepancies,
            "stages": _stages(stats),
            "cpu_ms_per_order": {
                "stockflow": round(usage.cpu_s / len(orders) * 1000, 3),
                **{k: round(v / len(orders) * 1000, 3) for k, v in usage.servers_cpu_s.items()},
            },
        }
        self.say(f"latency at {rate:.0f}/s", result)
        return result

    def say(self, label: str, result: dict[str, Any]) -> None:
        console.print(f"[bold]{label}[/bold]: {json.dumps(result, default=str)}")


def _stages(stats: dict[str, Any]) -> dict[str, Any]:
    """Each stage's batches: how many, how big, and milliseconds per batch in each step."""
    stages: dict[str, Any] = {}
    for name in ("router", "applier"):
        loop = stats.get(name) or {}
        batches = loop.get("batches") or 0
        if not batches:
            continue
        steps = dict(loop.get("seconds", {}))
        if name == "applier":
            steps.pop("handle", None)  # shown step by step instead
            steps.update(stats.get("applier_seconds", {}))
        stages[name] = {
            "batches": batches,
            "messages_per_batch": round(loop["messages"] / batches, 1),
            "ms_per_batch": {k: round(v / batches * 1000, 2) for k, v in steps.items()},
        }
    return stages


def run(
    quick: bool, out: Path, *, patch_section: bool = True, patch_rounds: int = 0
) -> dict[str, Any]:
    """The whole benchmark; ``patch_rounds``: the patch section's rounds (0: its default)."""
    base = load_settings()
    Stack(base).up()
    bench = Bench(base, quick=quick, out=out)
    with bench.progress:
        return _run(bench, base, quick, patch_rounds if patch_section else None)


def _run(bench: Bench, base: Settings, quick: bool, patch_rounds: int | None) -> dict[str, Any]:
    n = bench.scale
    started = time.time()
    results: dict[str, Any] = {"machine": machine(), "quick": quick, "workloads": {}}
    results["services"] = {st.name: st.version for st in Stack(base).status()}
    w = results["workloads"]
    w["zipf"] = bench.throughput(
        headline_workload("zipf", quick=quick), baseline=True, ceilings_too=True
    )
    if patch_rounds is not None:  # next to the headline, so its ratio is measured close to this one
        results["cas_patch"] = cas_section.run_section(
            base,
            headline_workload("zipf", quick=quick),
            quick=quick,
            progress=bench.progress,
            rounds=patch_rounds,
        )
        bench.say("the FerretDB compare-and-set patch", results["cas_patch"])
    w["uniform"] = bench.throughput(
        headline_workload("uniform", quick=quick), baseline=True, ceilings_too=True
    )
    w["hot"] = bench.throughput(
        headline_workload("hot", quick=quick), baseline=True, ceilings_too=True
    )
    zipf_max = w["zipf"]["stockflow"]["orders_per_s"]
    seconds = 3 if quick else 20
    rates = [200.0, 400.0] if quick else [1000.0, 5000.0, round(zipf_max / 2)]
    results["latency"] = {f"{rate:.0f}": bench.latency(rate, seconds, n(10_000)) for rate in rates}
    sweeps: dict[str, Any] = {"batch_size": {}, "products": {}, "stream_length": {}}
    batch_sizes = [500, 2000] if not quick else [100]
    for size in batch_sizes:
        r = bench.throughput(Workload("zipf", n(100_000), n(10_000)), baseline=False,
                             ceilings_too=False, batch_size=size)  # fmt: skip
        sweeps["batch_size"][str(size)] = _brief(r)
    sweeps["batch_size"][str(base.batch_size)] = _brief(w["zipf"])
    for products in [100, 100_000] if not quick else [50]:
        r = bench.throughput(Workload("zipf", n(100_000), products), baseline=False,
                             ceilings_too=False)  # fmt: skip
        sweeps["products"][str(products)] = _brief(r)
    sweeps["products"][str(n(10_000))] = _brief(w["zipf"])
    for length in [50_000, 100_000, 400_000] if not quick else [1000]:
        r = bench.throughput(Workload("zipf", n(length), n(10_000)), baseline=False,
                             ceilings_too=False)  # fmt: skip
        sweeps["stream_length"][str(n(length))] = _brief(r)
    sweeps["stream_length"][str(n(200_000))] = _brief(w["zipf"])
    results["sweeps"] = sweeps
    results["seconds"] = round(time.time() - started)
    results.update(headline(results))
    return results


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    sf = r["stockflow"]
    return {
        "orders_per_s": sf["orders_per_s"],
        "peak_rss_mb": sf["peak_rss_mb"],
        "rss_quartiles_mb": sf["rss_quartiles_mb"],
        "audit_discrepancies": sf["audit_discrepancies"],
    }


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures, for the Zipf workload."""
    zipf = results["workloads"]["zipf"]
    sf, base, ceil = zipf["stockflow"], zipf["baseline"], zipf["ceilings"]
    slowest = min(ceil["kafka_consume_orders_per_s"], ceil["mongodb_aggregated_orders_per_s"])
    audits = [r["stockflow"]["audit_discrepancies"] for r in results["workloads"].values()] + [
        r["audit_discrepancies"] for r in results["latency"].values()
    ]
    audits += [b["audit_discrepancies"] for sweep in results["sweeps"].values()
               for b in sweep.values()]  # fmt: skip
    patch = results.get("cas_patch")
    if patch is not None:
        audits.append(cas_section.audit_discrepancies(patch))
    lowest_rate = min(results["latency"], key=float)
    return {
        "baseline_orders_per_s": base["orders_per_s"],
        "stockflow_orders_per_s": sf["orders_per_s"],
        "speedup_vs_baseline": round(sf["orders_per_s"] / base["orders_per_s"], 1)
        if base["orders_per_s"]
        else None,
        "slowest_ceiling_orders_per_s": slowest,
        "fraction_of_ceiling": round(sf["orders_per_s"] / slowest, 3) if slowest else None,
        "p99_ms_at_1000_per_s": results["latency"].get("1000", {}).get("p99_ms"),
        "p99_ms_at_lowest_rate": results["latency"][lowest_rate]["p99_ms"],
        "audit_discrepancies": sum(audits),
        "cas_patch_speedup_vs_baseline": patch["speedup_with_patch"] if patch else None,
        "cas_patch_target_met": patch["target_met"] if patch else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A tiny run (1/100 of the sizes) to check the benchmark works.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="Where latest.json and the chart go [default: bench/results].",
    )
    parser.add_argument(
        "--no-patch-section",
        action="store_true",
        help="Leave out the section on FerretDB's compare-and-set patch (two private FerretDBs).",
    )
    parser.add_argument(
        "--patch-rounds",
        type=int,
        default=0,
        help="Turns of each FerretDB build in that section (median) [default: 1].",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="Also rewrite the figures table in docs/performance.md.",
    )
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(
        args.quick,
        args.out,
        patch_section=not args.no_patch_section,
        patch_rounds=args.patch_rounds,
    )
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    from bench.report import chart, docs_table

    chart(results, args.out / "latest.png")
    if args.write_docs:
        docs_table(results, ROOT / "docs" / "performance.md")
    console.print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.png'}")
    console.print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}))
    return 0 if results["audit_discrepancies"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
