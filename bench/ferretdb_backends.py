"""Compare FerretDB's SQLite and PostgreSQL backends on this machine, side by side.

Each backend gets a fresh private instance (own port and state folder). Measured:

- start-up: process start until a MongoDB ping succeeds (PostgreSQL's own start apart);
- the update stockflow does (``{product_id, stock >= q}`` + ``$inc``) from one writer on a
  100-product and a 10,000-product collection, and from four writers on distinct products;
- lost updates: four writers decrementing one product at once (stock FerretDB v1 applies
  updates as read-modify-write, so some are lost; the count shows how many; the local
  build's compare-and-set patch loses none, ``bench/ferretdb_cas.py`` compares the builds);
- bulk updates: one ``update`` command of N statements, for N below and above the
  connection-pool size (stock FerretDB v1 keeps each statement's cursor open until the
  command ends, so a command with more statements than the pool deadlocks the server; the
  local build's pool patch fixes that, so "server hung" here means the patch is missing).

Usage: ``python bench/ferretdb_backends.py [--updates N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from stockflow.config import FerretBackend, Settings
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.postgres import PostgresService
from stockflow.stack.service import Service

Doc = dict[str, Any]
BIG = 10**9


def _start(service: Service) -> float:
    begin = time.perf_counter()
    service.dir.mkdir(parents=True, exist_ok=True)
    service.provision(lambda _: None)
    service.prepare(lambda _: None)
    _, pid = service.start(lambda _: None)
    service.wait_ready(pid)
    return time.perf_counter() - begin


def _decrement(col: Collection[Doc], pid: int) -> None:
    col.update_one({"product_id": pid, "stock": {"$gte": 1}}, {"$inc": {"stock": -1}})


def _writers(url: str, collection: str, targets: list[int], per_writer: int) -> tuple[float, int]:
    """``len(targets)`` threads, each decrementing its product; returns (updates/s, errors)."""
    errors = 0
    lock = threading.Lock()

    def run(pid: int) -> None:
        nonlocal errors
        client: MongoClient[Doc] = MongoClient(url)
        col = client.bench[collection]
        for _ in range(per_writer):
            try:
                _decrement(col, pid)
            except PyMongoError:
                with lock:
                    errors += 1
        client.close()

    threads = [threading.Thread(target=run, args=(pid,)) for pid in targets]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(targets) * per_writer / (time.perf_counter() - begin), errors


def _bulk_completes(url: str, statements: int) -> bool:
    client: MongoClient[Doc] = MongoClient(url, socketTimeoutMS=10_000)
    col = client.bench[f"bulk{statements}"]
    col.insert_many([{"product_id": i, "stock": BIG} for i in range(10)])
    ops = [UpdateOne({"product_id": i % 10}, {"$inc": {"stock": -1}}) for i in range(statements)]
    try:
        col.bulk_write(ops, ordered=True)
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


def measure(backend: FerretBackend, updates: int, port: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"ferret-{backend}-") as tmp:
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
        settings = Settings(
            state_dir=Path(tmp),
            ferretdb_backend=backend,
            ferretdb_port=port,
            postgres_port=port + 1,
        )
        result: dict[str, Any] = {"backend": backend}
        services: list[Service] = []
        try:
            if backend == "postgresql":
                services.append(PostgresService(settings))
                result["postgres_start_s"] = round(_start(services[-1]), 2)
            services.append(FerretDBService(settings))
            result["ferretdb_start_s"] = round(_start(services[-1]), 2)
            url = settings.mongodb_url
            client: MongoClient[Doc] = MongoClient(url)
            for name, size in (("small", 100), ("large", 10_000)):
                col = client.bench[name]
                col.create_index("product_id", unique=True)
                col.insert_many([{"product_id": i, "stock": BIG} for i in range(size)])
            timed: list[tuple[str, Callable[[], None]]] = [
                ("updates_per_s_100_products", lambda: _decrement(client.bench.small, 7)),
                ("updates_per_s_10k_products", lambda: _decrement(client.bench.large, 4321)),
            ]
            for key, step in timed:
                count = updates if "100_" in key else max(50, updates // 20)
                begin = time.perf_counter()
                for _ in range(count):
                    step()
                result[key] = round(count / (time.perf_counter() - begin))
            rate, errors = _writers(url, "small", [1, 2, 3, 4], updates // 4)
            result["updates_per_s_4_writers"] = round(rate)
            result["errors_4_writers"] = errors
            before = BIG - int(client.bench.small.find_one({"product_id": 50})["stock"])  # type: ignore[index]
            rate, errors = _writers(url, "small", [50] * 4, updates // 4)
            done = 4 * (updates // 4) - errors
            after = BIG - int(client.bench.small.find_one({"product_id": 50})["stock"])  # type: ignore[index]
            result["lost_updates_4_writers_one_product"] = f"{done - (after - before)} of {done}"
            client.close()
            for statements in (40, 200):
                # The larger command deadlocked stock FerretDB on both backends: last.
                result[f"bulk_{statements}_statements"] = (
                    "ok" if _bulk_completes(url, statements) else "server hung"
                )
        finally:
            for service in reversed(services):
                service.stop()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000, help="updates per measurement")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows = [measure("sqlite", args.updates, 38017), measure("postgresql", args.updates, 38117)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| measure | " + " | ".join(str(r["backend"]) for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys[1:]:
        print(f"| {key} | " + " | ".join(str(r.get(key, "-")) for r in rows) + " |")


if __name__ == "__main__":
    main()
