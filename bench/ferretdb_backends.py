"""Compare FerretDB's SQLite and PostgreSQL backends on this machine, side by side.

Each backend gets a fresh private instance (own port and state folder). Measured:
start-up time (process start until a MongoDB ping succeeds, PostgreSQL's own start shown
apart), then the stock update stockflow does (a guarded ``$inc``) from one writer and from
four concurrent writers on distinct products, errors counted (SQLITE_BUSY shows up here),
and a bulk insert. Usage: ``python bench/ferretdb_backends.py [--updates N]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient, UpdateOne
from pymongo.errors import PyMongoError

from stockflow.config import Settings
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.postgres import PostgresService
from stockflow.stack.service import Service


def _start(service: Service) -> float:
    begin = time.perf_counter()
    _, pid = service.start(lambda _: None)
    service.wait_ready(pid)
    return time.perf_counter() - begin


def _updates(url: str, product_ids: list[int], per_writer: int) -> tuple[float, int]:
    errors = 0
    lock = threading.Lock()

    def writer(pid: int) -> None:
        nonlocal errors
        client: MongoClient[dict[str, Any]] = MongoClient(url)
        col = client.bench.products
        for _ in range(per_writer):
            try:
                col.update_one({"product_id": pid, "stock": {"$gte": 1}}, {"$inc": {"stock": -1}})
            except PyMongoError:
                with lock:
                    errors += 1
        client.close()

    threads = [threading.Thread(target=writer, args=(pid,)) for pid in product_ids]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    return len(product_ids) * per_writer / elapsed, errors


def measure(backend: str, updates: int, base_port: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"ferret-{backend}-") as tmp:
        Path(tmp).chmod(0o755)  # PostgreSQL runs as its own user and must reach its folder
        settings = Settings(
            state_dir=Path(tmp),
            ferretdb_backend=backend,  # type: ignore[arg-type]
            ferretdb_port=base_port,
            postgres_port=base_port + 1,
        )
        result: dict[str, Any] = {"backend": backend}
        services: list[Service] = []
        try:
            if backend == "postgresql":
                pg = PostgresService(settings)
                services.append(pg)
                pg.provision(lambda _: None)
                pg.dir.mkdir(parents=True, exist_ok=True)
                pg.prepare(lambda _: None)
                result["postgres_start_s"] = round(_start(pg), 2)
            ferret = FerretDBService(settings)
            services.append(ferret)
            result["ferretdb_start_s"] = round(_start(ferret), 2)
            url = settings.mongodb_url
            client: MongoClient[dict[str, Any]] = MongoClient(url)
            col = client.bench.products
            col.create_index("product_id", unique=True)
            col.insert_many([{"product_id": i, "stock": 10**9} for i in range(1, 20)])
            rate, errors = _updates(url, [1], updates)
            result["updates_per_s_1_writer"] = round(rate)
            result["errors_1_writer"] = errors
            rate, errors = _updates(url, [1, 2, 3, 4], updates // 4)
            result["updates_per_s_4_writers"] = round(rate)
            result["errors_4_writers"] = errors
            rate, errors = _updates(url, [5] * 4, updates // 4)
            result["updates_per_s_4_writers_same_product"] = round(rate)
            result["errors_4_writers_same_product"] = errors
            final = col.find_one({"product_id": 5})
            applied = 4 * (updates // 4) - errors
            result["lost_updates_same_product"] = (
                applied - (10**9 - final["stock"]) if final else None
            )
            rate, errors = _updates(url, list(range(11, 19)), updates // 8)
            result["updates_per_s_8_writers"] = round(rate)
            result["errors_8_writers"] = errors
            ops = [
                UpdateOne({"product_id": 11 + i % 8, "stock": {"$gte": 1}}, {"$inc": {"stock": -1}})
                for i in range(1000)
            ]
            timed: MongoClient[dict[str, Any]] = MongoClient(url, socketTimeoutMS=30_000)
            try:
                begin = time.perf_counter()
                for _ in range(max(1, updates // 1000)):
                    timed.bench.products.bulk_write(ops, ordered=True)
                elapsed = time.perf_counter() - begin
                result["bulk_updates_per_s"] = round(max(1, updates // 1000) * 1000 / elapsed)
            except PyMongoError as exc:
                result["bulk_updates_per_s"] = f"failed: {type(exc).__name__} (server hung)"
                services[-1].stop()  # a hung server would block the next steps
                return result
            finally:
                timed.close()
            docs = [{"product_id": 1000 + i, "stock": 100} for i in range(10_000)]
            begin = time.perf_counter()
            col.insert_many(docs)
            result["bulk_inserts_per_s"] = round(len(docs) / (time.perf_counter() - begin))
            client.close()
        finally:
            for service in reversed(services):
                service.stop()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000, help="updates per measurement")
    args = parser.parse_args()
    rows = [measure("sqlite", args.updates, 38017), measure("postgresql", args.updates, 38117)]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
