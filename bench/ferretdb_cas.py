"""What FerretDB's compare-and-set patch costs: the builds with and without it, side by side.

Both builds (``ferretdb_patches.BUILD`` and ``WITHOUT_CAS``, each built into the cache if
missing) run at once, each on a fresh private PostgreSQL and its own ports, and take turns
on the same workloads, several rounds; the median of the rounds is reported:

- ``guarded $inc``: ``{product_id, stock >= 1}`` + ``$inc``, one writer (the seed's update);
- ``compare-and-set``: stockflow's single update, ``{_id, stock, _stockflow.last}`` + ``$set``
  of what was read, one writer, read and write per update;
- ``bulk compare-and-set``: stockflow's write (``Inventory.write_changes``): 2,000 products
  read, then changed in unordered commands of 16 statements, 8 commands side by side;
- ``contended``: 8 writers of one product, each read then compare-and-set, retried on "not
  matched": successful updates/s and how many of them the final stock lacks (lost);
- CPU time per update of FerretDB and of PostgreSQL (all its processes) in each workload,
  from ``/proc``: a busy machine disturbs it less than it disturbs the rates.

The pieces (:class:`Instance`, :func:`private_instances`, :func:`compare`) also serve
``make bench``'s section on the patch (``bench/cas_section.py``), which runs stockflow and the
seed's design on each build.

Usage: ``python -m bench.ferretdb_cas [--updates N] [--rounds R] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection

from stockflow.config import Settings
from stockflow.ledger import CHUNK, chunks
from stockflow.planner import MARKER
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.ferretdb_patches import BUILD, WITHOUT_CAS, Build
from stockflow.stack.postgres import PostgresService
from stockflow.stack.service import Reporter, Service
from stockflow.testing import free_ports

Doc = dict[str, Any]
BIG = 10**9
BULK_PRODUCTS = 2000
WRITERS = 8
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and its descendants that are alive now."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total = (int(fields[11]) + int(fields[12])) / TICKS
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (OSError, ValueError):
        pass  # gone in between
    return total


class Instance:
    """One build of FerretDB on its own PostgreSQL, in a temporary state folder."""

    def __init__(self, build: Build, ports: tuple[int, int], state: Path) -> None:
        state.mkdir()
        state.chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
        self.build = build
        self.settings = Settings(
            state_dir=state,
            mongodb_uri=None,  # a MONGODB_URI in the environment would make FerretDB "external"
            ferretdb_backend="postgresql",
            ferretdb_port=ports[0],
            postgres_port=ports[1],
        )
        self.services: list[Service] = [
            PostgresService(self.settings),
            FerretDBService(self.settings, build),
        ]
        self.pids: list[int] = []

    def start(self, report: Reporter = print) -> None:
        """Start PostgreSQL, then FerretDB (built into the cache first if it is missing)."""
        for service in self.services:
            service.dir.mkdir(parents=True, exist_ok=True)
            service.provision(report)
            service.prepare(lambda _: None)
            _, pid = service.start(lambda _: None)
            service.wait_ready(pid)
            self.pids.append(pid or 0)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def client(self) -> MongoClient[Doc]:
        return MongoClient(self.settings.mongodb_url)

    def serve(self, base: Settings) -> Settings:
        """``base`` (Kafka, Redis, names) with this instance as its MongoDB server."""
        return base.model_copy(update={"mongodb_uri": SecretStr(self.settings.mongodb_url)})

    def server_pids(self) -> dict[str, list[int]]:
        """This instance's PostgreSQL and FerretDB pids, by service name."""
        return {service.name: [pid] for service, pid in zip(self.services, self.pids, strict=True)}

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by this instance's PostgreSQL (all its processes) and
        FerretDB: the machine's other servers of the same name are not counted."""
        return {
            service.name: cpu_seconds(pid)
            for service, pid in zip(self.services, self.pids, strict=True)
        }


def _timed(instance: Instance, updates: int, work: Callable[[], int]) -> dict[str, float]:
    """Run ``work`` (returns the updates it made): updates/s, and CPU µs per update of
    PostgreSQL (all its processes) and of FerretDB."""
    before = instance.cpu()
    begin = time.perf_counter()
    done = work()
    wall = time.perf_counter() - begin
    used = {name: seconds - before[name] for name, seconds in instance.cpu().items()}
    assert done == updates, (done, updates)
    return {
        "per_s": done / wall,
        "wall_s": wall,
        "postgres_cpu_us": used["postgres"] / done * 1e6,
        "ferretdb_cpu_us": used["ferretdb"] / done * 1e6,
    }


def _guarded_inc(col: Collection[Doc], updates: int) -> int:
    for _ in range(updates):
        col.update_one({"product_id": 7, "stock": {"$gte": 1}}, {"$inc": {"stock": -1}})
    return updates


def _compare_and_set(col: Collection[Doc], doc_id: Any, updates: int) -> tuple[int, int]:
    """Read-then-CAS ``updates`` times; returns (successes, attempts)."""
    done = attempts = 0
    while done < updates:
        attempts += 1
        doc = col.find_one({"_id": doc_id})
        assert doc is not None
        last = doc.get(MARKER, {}).get("last")
        result = col.update_one(
            {
                "_id": doc_id,
                "stock": doc["stock"],
                f"{MARKER}.last": {"$exists": False} if last is None else last,
            },
            {"$set": {"stock": doc["stock"] - 1, MARKER: {"last": attempts}}},
        )
        done += result.matched_count
    return done, attempts


def _bulk(col: Collection[Doc], pool: ThreadPoolExecutor) -> int:
    """One ``write_changes`` of every product: read all, then conditional updates in chunks."""
    read = list(col.find({}))
    ops = [
        UpdateOne(
            {
                "_id": doc["_id"],
                "stock": doc["stock"],
                f"{MARKER}.last": doc[MARKER]["last"] if MARKER in doc else {"$exists": False},
            },
            {"$set": {"stock": doc["stock"] - 1, MARKER: {"last": doc["stock"]}}},
        )
        for doc in read
    ]
    matched = sum(
        pool.map(
            lambda chunk: col.bulk_write(list(chunk), ordered=False).matched_count,
            chunks(ops, CHUNK),
        )
    )
    assert matched == len(ops), (matched, len(ops))
    return matched


def _contended(instance: Instance, updates: int) -> dict[str, float]:
    client = instance.client()
    col = client.bench.contended
    col.delete_many({})
    col.insert_one({"_id": "hot", "stock": BIG})
    per_writer = updates // WRITERS
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def writer() -> None:
        own = instance.client()
        outcome = _compare_and_set(own.bench.contended, "hot", per_writer)
        own.close()
        with lock:
            results.append(outcome)

    def work() -> int:
        threads = [threading.Thread(target=writer) for _ in range(WRITERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(done for done, _ in results)

    row = _timed(instance, WRITERS * per_writer, work)
    final = col.find_one({"_id": "hot"})
    assert final is not None
    done = sum(d for d, _ in results)
    row["lost"] = done - (BIG - int(final["stock"]))
    row["kept_per_s"] = (done - row["lost"]) / row["wall_s"]
    row["attempts_per_update"] = sum(a for _, a in results) / done
    client.close()
    return row


def measure(instance: Instance, updates: int) -> dict[str, dict[str, float]]:
    client = instance.client()
    db = client.bench
    db.drop_collection("small")
    db.drop_collection("bulk")
    db.small.create_index("product_id", unique=True)
    db.small.insert_many([{"_id": i, "product_id": i, "stock": BIG} for i in range(100)])
    db.bulk.insert_many([{"_id": i, "product_id": i, "stock": BIG} for i in range(BULK_PRODUCTS)])
    rows: dict[str, dict[str, float]] = {}
    rows["guarded $inc"] = _timed(instance, updates, lambda: _guarded_inc(db.small, updates))
    rows["compare-and-set"] = _timed(
        instance, updates, lambda: _compare_and_set(db.small, 42, updates)[0]
    )
    with ThreadPoolExecutor(8) as pool:
        rounds = max(1, updates // BULK_PRODUCTS)
        rows["bulk compare-and-set"] = _timed(
            instance,
            rounds * BULK_PRODUCTS,
            lambda: sum(_bulk(db.bulk, pool) for _ in range(rounds)),
        )
    rows["contended"] = _contended(instance, updates)
    client.close()
    return rows


@contextmanager
def private_instances(builds: list[Build], report: Reporter = print) -> Iterator[list[Instance]]:
    """Each build started on a fresh PostgreSQL of its own, on free ports; all stopped and
    their folders removed at the end."""
    with tempfile.TemporaryDirectory(prefix="ferret-cas-") as tmp:
        Path(tmp).chmod(0o755)
        ports = free_ports(2 * len(builds))
        instances = [
            Instance(build, (ports[2 * n], ports[2 * n + 1]), Path(tmp) / build.tag)
            for n, build in enumerate(builds)
        ]
        try:
            for instance in instances:
                instance.start(report)
            yield instances
        finally:
            for instance in instances:
                instance.stop()


Medians = dict[str, dict[str, dict[str, float]]]
"""Build tag -> workload -> measure -> the median of the rounds."""


def compare(instances: list[Instance], updates: int, rounds: int) -> Medians:
    """The workloads on each instance in turn, ``rounds`` times; the medians per build."""
    samples: dict[str, list[dict[str, dict[str, float]]]] = {i.build.tag: [] for i in instances}
    for _ in range(rounds):
        for instance in instances:
            samples[instance.build.tag].append(measure(instance, updates))
    medians: Medians = {}
    for tag, runs in samples.items():
        medians[tag] = {
            workload: {key: statistics.median(r[workload][key] for r in runs) for key in row}
            for workload, row in runs[0].items()
        }
    return medians


def run(updates: int, rounds: int) -> Medians:
    with private_instances([WITHOUT_CAS, BUILD]) as instances:
        return compare(instances, updates, rounds)


def table(result: Medians) -> str:
    """The medians as a Markdown table, and the contended run's outcome per build.

    Builds in the order measured; with two (before and after the patch), a change column.
    """
    tags = list(result)
    pair = len(tags) == 2
    head = [
        "workload",
        *(f"updates/s {tag}" for tag in tags),
        *(["change"] if pair else []),
        *(f"FerretDB CPU µs/update {tag}" for tag in tags),
        *(f"PostgreSQL CPU µs/update {tag}" for tag in tags),
    ]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for workload in result[tags[0]]:
        rows = [result[tag][workload] for tag in tags]
        cells = [workload, *(f"{row['per_s']:,.0f}" for row in rows)]
        if pair:
            cells.append(f"{(rows[1]['per_s'] / rows[0]['per_s'] - 1) * 100:+.0f}%")
        cells += [f"{row['ferretdb_cpu_us']:,.0f}" for row in rows]
        cells += [f"{row['postgres_cpu_us']:,.0f}" for row in rows]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for tag, rows in result.items():
        hot = rows["contended"]
        out.append(
            f"- {tag}, contended: {hot['lost']:,.0f} matched updates lost, "
            f"{hot['kept_per_s']:,.0f} kept updates/s, "
            f"{hot['attempts_per_update']:.2f} attempts per matched update"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000, help="updates per workload")
    parser.add_argument("--rounds", type=int, default=3, help="turns per build (median)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--table", type=Path, help="print the table of an earlier --json run")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    result = run(args.updates, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(table(result))


if __name__ == "__main__":
    main()
