"""The benchmarks' reports: the chart (PNG) and tables of docs/performance.md, and the
generated figures of docs/scaling.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.ferretdb_cas import table as micro_table

START = "<!-- bench:start (written by `make bench`; edit around it) -->"
END = "<!-- bench:end -->"
SCALING_START = "<!-- scaling:start (written by `make bench-scale`; edit around it) -->"
SCALING_END = "<!-- scaling:end -->"


def chart(results: dict[str, Any], path: Path) -> None:
    """Orders per second of each contestant, per workload, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    series = {
        "baseline (seed's design)": lambda r: r["baseline"]["orders_per_s"],
        "stockflow": lambda r: r["stockflow"]["orders_per_s"],
        "ceiling: Kafka consume": lambda r: r["ceilings"]["kafka_consume_orders_per_s"],
        "ceiling: MongoDB, one $inc per product": lambda r: r["ceilings"][
            "mongodb_aggregated_orders_per_s"
        ],
        "MongoDB, one $inc per order": lambda r: r["ceilings"]["mongodb_per_order_orders_per_s"],
    }
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / len(series)
    for i, (label, get) in enumerate(series.items()):
        values = [get(results["workloads"][w]) for w in workloads]
        xs = [x + i * width for x in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7, rotation=90,
                     padding=2)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("orders per second (log scale)")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(workloads))])
    ax.set_xticklabels([_workload_label(results["workloads"][w], w) for w in workloads])
    speedup = results.get("speedup_vs_baseline")
    ax.set_title(f"stockflow vs the seed's per-message design: {speedup}x on Zipf")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _workload_label(r: dict[str, Any], name: str) -> str:
    return f"{name}\n{r['orders']:,} orders, {r['products']:,} products"


def _n(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Measured on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['system']}, "
        f"Python {m['python']}; services: "
        + ", ".join(f"{v}" for v in results.get("services", {}).values() if v)
        + f". Whole run: {results['seconds']} s.",
        "",
        "| workload | baseline orders/s | stockflow orders/s | speed-up | Kafka consume/s "
        "| MongoDB ceiling/s | of slowest ceiling | stockflow CPU s/1000 | servers CPU s/1000 "
        "| peak RSS MB | audit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["workloads"].items():
        sf, base, ceil = r["stockflow"], r["baseline"], r["ceilings"]
        slowest = min(ceil["kafka_consume_orders_per_s"], ceil["mongodb_aggregated_orders_per_s"])
        servers = sum(sf["servers_cpu_s_per_1000"].values())
        lines.append(
            f"| {name} ({r['orders']:,} orders, {r['products']:,} products) "
            f"| {_n(base['orders_per_s'])} | {_n(sf['orders_per_s'])} "
            f"| {sf['orders_per_s'] / base['orders_per_s']:.0f}x "
            f"| {_n(ceil['kafka_consume_orders_per_s'])} "
            f"| {_n(ceil['mongodb_aggregated_orders_per_s'])} "
            f"| {sf['orders_per_s'] / slowest:.0%} | {sf['cpu_s_per_1000']:.2f} "
            f"| {servers:.2f} | {_n(sf['peak_rss_mb'])} | {sf['audit_discrepancies']} |"
        )
    if "cas_patch" in results:
        lines += ["", *patch_section(results["cas_patch"])]
    lines += [
        "",
        "| offered rate | orders | p50 ms | p95 ms | p99 ms | max ms "
        "| until durable p50 / p99 | then until seen p50 / p99 | audit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate, r in results["latency"].items():
        durable, seen = r.get("until_durable_ms", {}), r.get("durable_to_seen_ms", {})
        lines.append(
            f"| {_n(float(rate))}/s (measured {_n(r['offered_per_s'])}/s) | {r['orders']:,} "
            f"| {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} "
            f"| {durable.get('p50', '-')} / {durable.get('p99', '-')} "
            f"| {seen.get('p50', '-')} / {seen.get('p99', '-')} "
            f"| {r['audit_discrepancies']} |"
        )
    slowest = min(results["latency"], key=float)
    stages = results["latency"][slowest].get("stages")
    if stages:
        cpu = results["latency"][slowest].get("cpu_ms_per_order", {})
        lines += [
            "",
            f"Where an order's time goes at {_n(float(slowest))}/s offered (per batch of each "
            "stage; CPU per order over the run: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in cpu.items() if v)
            + "):",
            "",
        ]
        for name, stage in stages.items():
            steps = ", ".join(
                f"{step} {ms:.1f}"
                for step, ms in sorted(stage["ms_per_batch"].items(), key=lambda kv: -kv[1])
            )
            lines.append(
                f"- {name}: {stage['batches']:,} batches of {stage['messages_per_batch']:.0f} "
                f"messages; ms per batch: {steps}"
            )
    for sweep, label in (
        ("batch_size", "batch size"),
        ("products", "products"),
        ("stream_length", "orders in the stream"),
    ):
        lines += [
            "",
            f"| {label} | stockflow orders/s | peak RSS MB | RSS at ¼, ½, ¾, end (MB) | audit |",
            "|---:|---:|---:|---|---:|",
        ]
        for key, r in sorted(results["sweeps"][sweep].items(), key=lambda kv: int(kv[0])):
            quartiles = ", ".join(f"{v:.0f}" for v in r["rss_quartiles_mb"])
            lines.append(
                f"| {int(key):,} | {_n(r['orders_per_s'])} | {_n(r['peak_rss_mb'])} "
                f"| {quartiles} | {r['audit_discrepancies']} |"
            )
    zipf = results["workloads"]["zipf"]["stockflow"]
    if zipf.get("applier_seconds"):
        total = sum(zipf["applier_seconds"].values())
        lines += ["", "Where the applier's time went (Zipf run):", ""]
        lines += [
            f"- {step}: {sec:.1f} s ({sec / total:.0%})"
            for step, sec in sorted(zipf["applier_seconds"].items(), key=lambda kv: -kv[1])
        ]
    return "\n".join(lines)


def patch_section(patch: dict[str, Any]) -> list[str]:
    """The FerretDB compare-and-set patch: stockflow and the seed's design on each build."""
    w = patch["workload"]
    target = patch["target_speedup"]
    rounds = f"{patch['rounds']} round" + ("s" if patch["rounds"] != 1 else "")
    lines = [
        f"**The FerretDB compare-and-set patch** (the {w['name']} workload as above: "
        f"{w['orders']:,} orders, {w['products']:,} products; {patch['unpatched_build']} is "
        f"FerretDB built without the patch, {patch['patched_build']} with it, as the local "
        "stack runs it; each on a fresh private PostgreSQL; stockflow and the seed's design "
        f"take turns on them, {rounds}, medians). How to read it: with the patch, the ratio "
        f"must stay at least {target:.0f}x; the two rows compared give the patch's cost. Their "
        "rates were measured minutes apart on one machine, so the CPU per order (of the "
        "private servers' own processes) is the steadier figure.",
        "",
        "| FerretDB build | stockflow orders/s | seed orders/s | ratio "
        "| FerretDB + PostgreSQL CPU ms/order, stockflow | same, seed | audit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def label(tag: str) -> str:
        return f"{tag} ({'with' if tag == patch['patched_build'] else 'without'} the patch)"

    for tag, b in patch["builds"].items():
        with_patch = tag == patch["patched_build"]
        ratio = b["speedup_vs_baseline"]
        verdict = ""
        if with_patch and patch.get("target_met") is not None:
            verdict = f" ({'meets' if patch['target_met'] else 'MISSES'} {target:.0f}x)"
        cpu = b["servers_cpu_ms_per_order"]
        lines.append(
            f"| {label(tag)} "
            f"| {_n(b['stockflow_orders_per_s'])} | {_n(b['baseline_orders_per_s'])} "
            f"| {_n(ratio, 1)}x{verdict} "
            f"| {cpu['stockflow']['ferretdb']:.2f} + {cpu['stockflow']['postgres']:.2f} "
            f"| {cpu['baseline']['ferretdb']:.2f} + {cpu['baseline']['postgres']:.2f} "
            f"| {b['audit_discrepancies']} |"
        )
    for tag, why in patch.get("skipped", {}).items():
        lines.append(f"| {label(tag)} | not run: {why} | | | | | |")
    change = patch.get("patch_change")
    if change:
        lines += [
            "",
            "The patch's cost, with against without: stockflow "
            + ", seed ".join(
                f"{change[who] * 100:+.0f}%" if change[who] is not None else "-"
                for who in ("stockflow", "baseline")
            )
            + " in orders/s.",
        ]
    if patch.get("micro"):
        lines += [
            "",
            "The same two servers under `bench/ferretdb_cas.py`'s micro-benchmark (medians; "
            "single compare-and-set, stockflow's bulk write, eight writers on one product):",
            "",
            micro_table(patch["micro"]),
        ]
    return lines


def docs_table(results: dict[str, Any], path: Path) -> None:
    """Replace the figures between the markers in ``path`` (the rest is prose)."""
    write_between(path, START, END, table(results), title="# Performance")


def scaling_docs(results: dict[str, Any], path: Path) -> None:
    """Replace the generated figures between the scaling markers in ``path``."""
    write_between(path, SCALING_START, SCALING_END, scaling_table(results), title="# Scaling out")


def write_between(path: Path, start: str, end: str, body: str, *, title: str) -> None:
    """Put ``body`` between the ``start`` and ``end`` marker lines of ``path``; a file without
    them gets them at its end (a missing file: a ``title`` line, then the markers)."""
    text = path.read_text() if path.exists() else f"{title}\n"
    if start not in text:
        text = f"{text.rstrip()}\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


SCALING_PROCESSES = {
    "supervisor": "supervisor",
    "kafka": "Kafka",
    "ferretdb": "FerretDB",
    "postgres": "PostgreSQL",
    "redis": "Redis",
    "reader": "outcome reader",
    "other": "other",
}


def _kafka_total(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k == "kafka" or k.startswith("kafka-"))


def _workers_total(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k.startswith("worker"))


def _workers_cell(r: dict[str, Any]) -> str:
    """The workers' CPU ms per order and cores, each worker's ms after an equals sign."""
    ms, cores = r["cpu_ms_per_order"], r["cores_busy"]
    cell = f"{_workers_total(ms):.3f} ({_workers_total(cores):.2f})"
    each = [v for k, v in sorted(ms.items()) if k.startswith("worker")]
    return cell if len(each) < 2 else f"{cell} = {' + '.join(f'{v:.3f}' for v in each)}"


def _cell(r: dict[str, Any], key: str) -> str:
    """CPU ms per order and, in brackets, cores busy over the run."""
    ms, cores = r["cpu_ms_per_order"], r["cores_busy"]
    if key == "kafka":
        return f"{_kafka_total(ms):.3f} ({_kafka_total(cores):.2f})"
    if key not in ms:
        return "-"
    return f"{ms[key]:.3f} ({cores[key]:.2f})"


def _busiest(r: dict[str, Any]) -> str:
    cores = dict(r["cores_busy"])
    kafka = _kafka_total(cores)
    cores = {k: v for k, v in cores.items() if not k.startswith("kafka")}
    if kafka:
        cores["kafka"] = kafka
    top = sorted(cores.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{SCALING_PROCESSES.get(k, k)} {v:.2f}" for k, v in top)


def scaling_table(results: dict[str, Any]) -> str:
    """The figures of ``bench.scaling``: throughput and CPU per process by worker count on
    one broker, then one broker against three."""
    m, w = results["machine"], results["workload"]
    cores = m["cores"]
    runs = results["runs"]
    lines = [
        f"Measured on {cores} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['system']}, "
        f"Python {m['python']}{' (quick run: figures not meaningful)' if results['quick'] else ''}"
        f". Workload: {w['orders']:,} orders over {w['products']:,} products, Zipf "
        f"(s = {w['zipf_s']}); {w['input_partitions']} input partitions, "
        f"{w['commands_partitions']} commands (and outcomes) partitions. Kafka: private, "
        f"{results['kafka_heap']} heap per node. Whole run: {results['seconds']} s.",
        "",
        f"CPU milliseconds per order of each process (in brackets: cores busy over the run, "
        f"of {cores}); *other* is the rest of the machine's busy time.",
        "",
        "| worker processes (MongoDB commands side by side, each) | orders/s "
        "| from start | vs 1 worker | machine busy (cores) | busiest (cores) | workers | "
        + " | ".join(SCALING_PROCESSES.values())
        + " | audit |",
        "|---|---:|---:|---:|---:|---|---:|" + "---:|" * len(SCALING_PROCESSES) + "---:|",
    ]
    one = [r for r in runs if r["brokers"] == 1]
    first = next((r for r in one if r["workers"] == 1), None)
    for r in sorted(one, key=lambda r: r["workers"]):
        ratio = f"{r['orders_per_s'] / first['orders_per_s']:.2f}x" if first else "-"
        workers = _workers_cell(r)
        cells = " | ".join(_cell(r, key) for key in SCALING_PROCESSES)
        lines.append(
            f"| {r['workers']} ({r.get('mongodb_concurrency', '-')}) "
            f"| {_n(r['orders_per_s'])} | {_n(r.get('orders_per_s_from_start'))} | {ratio} "
            f"| {r['machine_cores_busy']:.2f} of {cores} | {_busiest(r)} | {workers} | {cells} "
            f"| {r['audit_discrepancies']} |"
        )
    three = [r for r in runs if r["brokers"] == 3]
    if three:
        lines += [
            "",
            "| brokers | copies / min in sync | workers | orders/s | vs 1 broker "
            "| Kafka (each broker) | FerretDB | PostgreSQL | workers | all processes "
            "| machine busy (cores) | audit |",
            "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        pairs = [r for r in one if r["workers"] == three[0]["workers"]] + three
        for r in pairs:
            ms = r["cpu_ms_per_order"]
            brokers = sorted((k, v) for k, v in ms.items() if k.startswith("kafka"))
            each = " + ".join(f"{v:.3f}" for _, v in brokers)
            kafka = f"{_kafka_total(ms):.3f}" + (f" ({each})" if len(brokers) > 1 else "")
            measured = sum(v for k, v in ms.items() if k != "other")
            ratio = f"{r['orders_per_s'] / pairs[0]['orders_per_s']:.2f}x"
            lines.append(
                f"| {r['brokers']} | {r['replication_factor']} / {r['min_insync_replicas']} "
                f"| {r['workers']} | {_n(r['orders_per_s'])} | {ratio} | {kafka} "
                f"| {ms.get('ferretdb', 0):.3f} | {ms.get('postgres', 0):.3f} "
                f"| {_workers_total(ms):.3f} | {measured:.3f} "
                f"| {r['machine_cores_busy']:.2f} of {cores} | {r['audit_discrepancies']} |"
            )
    brokers = results["brokers"]
    lines += [
        "",
        "Private Kafka: "
        + "; ".join(
            f"{n} broker(s) up in {b['start_seconds']} s, resident after the runs "
            + ", ".join(f"{v} MiB" for v in b.get("rss_mb_after", {}).values())
            for n, b in brokers.items()
        )
        + ".",
    ]
    return "\n".join(lines)
