"""``make bench``'s section on FerretDB's compare-and-set patch: what it costs the pipeline.

The target (issue 10): with the patch, stockflow's Zipf throughput stays at least
:data:`TARGET_SPEEDUP` times the seed's design. FerretDB's two builds, ``WITHOUT_CAS`` and
``BUILD`` (the one the local stack runs), each start on a fresh private PostgreSQL and ports
of their own (``ferretdb_cas.private_instances``); Kafka and Redis are the shared stack's. The
headline's Zipf workload (the same generated orders) is pre-loaded once into one topic, and
each round:

1. stockflow runs through it on each build in turn (own database, commands, outcomes and
   dead-letter topics, consumer groups), audited after each run;
2. the seed's design runs on the first orders of the same topic, on each build in turn, for
   as long as in the headline;
3. the next round takes the builds in the other order (a machine that slows down or speeds up
   during the section then favours neither).

Per build: the median rate of each contestant over the rounds, their ratio, the audit, and
FerretDB's and PostgreSQL's CPU per order, counted on the private servers' own processes (the
shared stack's servers serve whatever else runs). Then ``ferretdb_cas``'s micro-benchmark on
the same two servers: medians of single, bulk and contended compare-and-set.

A run that cannot build a missing FerretDB build stops with its error; ``--quick`` leaves a
build out when it is not in the cache yet (building one takes minutes) and says so.

Usage on its own: ``python -m bench.cas_section [--popularity uniform] [--rounds R] [--quick]``
(``bench.run`` includes it unless ``--no-patch-section``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from bench.contestants import (
    BASELINE_SECONDS,
    QUICK_BASELINE_SECONDS,
    measure_baseline,
    measure_stockflow,
)
from bench.ferretdb_cas import Instance, Medians, compare, private_instances
from bench.measure import stack_servers
from bench.workload import (
    Workload,
    delete_run_topics,
    drop,
    headline_workload,
    isolated,
    preload,
    seed_products,
)
from stockflow.config import Settings, load_settings
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.ferretdb_patches import BUILD, WITHOUT_CAS, Build

TARGET_SPEEDUP = 40.0
"""stockflow's Zipf orders/s over the seed design's, with the patch (issue 10)."""
BUILDS = (WITHOUT_CAS, BUILD)
"""Before the patch, then with it: the order of the table and of the first round."""


@dataclass(frozen=True)
class Size:
    """How much the section does."""

    rounds: int
    baseline_seconds: float
    micro_updates: int
    micro_rounds: int


FULL = Size(rounds=1, baseline_seconds=BASELINE_SECONDS, micro_updates=2000, micro_rounds=3)
QUICK = Size(rounds=1, baseline_seconds=QUICK_BASELINE_SECONDS, micro_updates=100, micro_rounds=1)


def missing_builds(base: Settings) -> list[Build]:
    """The builds not in the cache (starting them first builds them, in minutes)."""
    return [b for b in BUILDS if not FerretDBService(base, b).binary.exists()]


class Section:
    """One section run: the workload pre-loaded once, then the builds' turns."""

    def __init__(
        self, base: Settings, workload: Workload, size: Size, progress: Progress, tmp: Path
    ) -> None:
        self.base = base
        self.workload = workload
        self.size = size
        self.progress = progress
        self.tmp = tmp
        self.orders = workload.orders_list(prefix=f"{workload.name}-")
        self.topic = isolated(base, f"cas-{workload.name}")
        self.contestants: list[Settings] = []

    def say(self, text: str) -> None:
        self.progress.console.print(text)

    def run(self, builds: list[Build]) -> tuple[dict[str, list[dict[str, Any]]], Medians]:
        """Every round on every build, then the micro-benchmark: (rounds per build, medians)."""
        task = self.progress.add_task("patch: preloading", total=len(self.orders))
        preload(self.topic, self.orders)
        self.progress.update(task, completed=len(self.orders))
        rounds: dict[str, list[dict[str, Any]]] = {b.tag: [] for b in builds}
        try:
            with private_instances(builds, report=self.say) as instances:
                try:
                    for n in range(self.size.rounds):
                        turns = instances if n % 2 == 0 else instances[::-1]
                        runs = {i.build.tag: {"stockflow": self._stockflow(i)} for i in turns}
                        for i in turns:
                            runs[i.build.tag]["baseline"] = self._baseline(i)
                        for tag, run in runs.items():
                            rounds[tag].append(run)
                    self.say("patch: micro-benchmark of the builds …")
                    micro = compare(instances, self.size.micro_updates, self.size.micro_rounds)
                finally:
                    for s in self.contestants:
                        drop(s)  # the cache entries are on the shared Redis
        finally:
            delete_run_topics(self.topic)
            for s in self.contestants:
                delete_run_topics(s, with_input=False)
        return rounds, micro

    def _contestant(self, instance: Instance, who: str) -> Settings:
        """Own database, groups, cache prefix and derived topics; the section's input topic;
        the instance as its MongoDB server."""
        s = isolated(instance.serve(self.base), f"{who}-{instance.build.tag}")
        own = s.topic  # isolated's unique name, kept as the stem of this run's topics
        s = s.model_copy(
            update={
                "topic": self.topic.topic,
                "commands_topic_name": f"{own}.by-product",
                "outcomes_topic_name": f"{own}.outcomes",
                "dlq_topic_name": f"{own}.dlq",
            }
        )
        self.contestants.append(s)
        seed_products(s, self.workload.products)
        return s

    def _servers(self, instance: Instance) -> dict[str, list[int]]:
        """The stack's Kafka and Redis; FerretDB and PostgreSQL: this instance's processes
        only (the machine's other servers of the same name are not counted)."""
        stack = {k: v for k, v in stack_servers(self.base).items() if k in ("kafka", "redis")}
        return {**stack, **instance.server_pids()}

    def _stockflow(self, instance: Instance) -> dict[str, Any]:
        s = self._contestant(instance, "sf")
        task = self.progress.add_task(
            f"patch: stockflow on {instance.build.tag}", total=len(self.orders)
        )
        return measure_stockflow(
            s,
            len(self.orders),
            lambda n: self.progress.advance(task, n),
            self.tmp,
            servers=self._servers(instance),
        )

    def _baseline(self, instance: Instance) -> dict[str, Any]:
        s = self._contestant(instance, "seed")
        self.say(f"patch: baseline (the seed's design) on {instance.build.tag} …")
        return measure_baseline(
            s,
            messages=len(self.orders),
            seconds=self.size.baseline_seconds,
            servers=self._servers(instance),
        )


def _per_order_ms(run: dict[str, Any]) -> dict[str, float]:
    """FerretDB's and PostgreSQL's CPU ms per order in one contestant's run."""
    servers = run["servers_cpu_s_per_1000"]
    return {name: servers.get(name, 0.0) for name in ("ferretdb", "postgres")}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One build's figures: median rates over the rounds, their ratio, audits, CPU per order."""
    sf = statistics.median(r["stockflow"]["orders_per_s"] for r in runs)
    seed = statistics.median(r["baseline"]["orders_per_s"] for r in runs)
    cpu: dict[str, dict[str, float]] = {}
    for who in ("stockflow", "baseline"):
        per_round = [_per_order_ms(r[who]) for r in runs]
        cpu[who] = {
            name: round(statistics.median(p[name] for p in per_round), 3) for name in per_round[0]
        }
    return {
        "stockflow_orders_per_s": round(sf, 1),
        "baseline_orders_per_s": round(seed, 1),
        "speedup_vs_baseline": round(sf / seed, 1) if seed else None,
        "audit_discrepancies": sum(r["stockflow"]["audit_discrepancies"] for r in runs),
        "outcomes": [r["stockflow"]["outcomes"] for r in runs],
        "baseline_orders_processed": [r["baseline"]["orders_processed"] for r in runs],
        "servers_cpu_ms_per_order": cpu,
        "rounds": runs,
    }


def run_section(
    base: Settings, workload: Workload, *, quick: bool, progress: Progress, rounds: int = 0
) -> dict[str, Any]:
    """The section's results (see the module's docstring); ``rounds`` 0: the size's own."""
    started = time.time()
    size = QUICK if quick else FULL
    if rounds:
        size = Size(rounds, size.baseline_seconds, size.micro_updates, size.micro_rounds)
    skipped: dict[str, str] = {}
    builds = list(BUILDS)
    if quick:
        for build in missing_builds(base):
            skipped[build.tag] = (
                "not in the cache: --quick does not build it (python -m bench.ferretdb_cas does)"
            )
            builds.remove(build)
    result: dict[str, Any] = {
        "workload": {
            "name": workload.name,
            "orders": workload.orders,
            "products": workload.products,
            "popularity": workload.popularity,
        },
        "target_speedup": TARGET_SPEEDUP,
        "unpatched_build": WITHOUT_CAS.tag,
        "patched_build": BUILD.tag,
        "rounds": size.rounds,
        "target_judged": not quick,
        "baseline_seconds": size.baseline_seconds,
        "skipped": skipped,
        "builds": {},
    }
    if builds:
        with tempfile.TemporaryDirectory(prefix="stockflow-bench-cas-") as tmp:
            section = Section(base, workload, size, progress, Path(tmp))
            per_build, micro = section.run(builds)
        result["builds"] = {tag: summary(runs) for tag, runs in per_build.items()}
        result["micro"] = micro
    result.update(verdict(result))
    result["seconds"] = round(time.time() - started)
    if result["target_met"] is False:
        progress.console.print(
            f"[bold red]the FerretDB compare-and-set patch: stockflow is "
            f"{result['speedup_with_patch']}x the seed's design on {BUILD.tag}, below the "
            f"{TARGET_SPEEDUP:.0f}x target[/bold red]"
        )
    return result


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Whether the patched build meets the target (not judged on a quick run's tiny sizes),
    and the patch's cost to each contestant."""
    builds = result["builds"]
    patched = builds.get(BUILD.tag)
    speedup = patched["speedup_vs_baseline"] if patched else None
    judged = result["target_judged"] and speedup is not None
    out: dict[str, Any] = {
        "speedup_with_patch": speedup,
        "target_met": speedup >= result["target_speedup"] if judged else None,
    }
    before = builds.get(WITHOUT_CAS.tag)
    if patched and before:
        out["patch_change"] = {
            who: round(patched[key] / before[key] - 1, 3) if before[key] else None
            for who, key in (
                ("stockflow", "stockflow_orders_per_s"),
                ("baseline", "baseline_orders_per_s"),
            )
        }
    return out


def audit_discrepancies(result: dict[str, Any]) -> int:
    return sum(b["audit_discrepancies"] for b in result["builds"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--popularity", choices=("zipf", "uniform", "hot"), default="zipf")
    parser.add_argument("--rounds", type=int, default=0, help="turns per build [full: 1]")
    parser.add_argument("--quick", action="store_true", help="1/100 of the sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    base = load_settings()
    workload = headline_workload(args.popularity, quick=args.quick)
    progress = Progress(console=Console(stderr=True))
    with progress:
        result = run_section(
            base, workload, quick=args.quick, progress=progress, rounds=args.rounds
        )
    print(json.dumps(result, indent=2))
    return 0 if audit_discrepancies(result) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
