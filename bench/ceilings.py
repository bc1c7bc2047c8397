"""What the services allow for the same work, with no pipeline in the way.

- Kafka: one consumer reading the workload's messages with no processing at all.
- MongoDB: the stock changes of the workload applied the fastest way the server takes them:
  one ``$inc`` per product for its orders' total (``aggregated``: the least work that reaches
  the same stock), in update commands of 16 statements, eight commands side by side. Also
  measured for reference: one guarded ``$inc`` per order (``per_order``), the same way.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Consumer
from pymongo import UpdateOne

from stockflow.config import Settings
from stockflow.orders import Order
from stockflow.pipeline import open_pipeline

THREADS = 8
CHUNK = 16


def kafka_consume(s: Settings, expected: int, timeout: float = 300) -> float:
    """Messages per second one plain consumer reads from the workload's topic."""
    consumer = Consumer(
        s.kafka_config(
            **{
                "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
    )
    consumer.subscribe([s.topic])
    count, first, last, count_at_first = 0, 0.0, 0.0, 0
    deadline = time.monotonic() + timeout
    try:
        while count < expected and time.monotonic() < deadline:
            batch = consumer.consume(500, 0.5)
            if not batch:
                continue
            now = time.perf_counter()
            if not first:
                first = now
                count_at_first = len(batch)
            count += sum(1 for m in batch if m.error() is None)
            last = now
    finally:
        consumer.close()
    span = last - first
    return (count - count_at_first) / span if span > 0 else 0.0


def _apply(s: Settings, ops: list[UpdateOne]) -> float:
    """Seconds to run ``ops`` in chunks, ``THREADS`` commands at a time."""
    with open_pipeline(s) as pipeline:
        products = pipeline.inventory.products
        chunks = [ops[i : i + CHUNK] for i in range(0, len(ops), CHUNK)]
        with ThreadPoolExecutor(THREADS) as pool:
            started = time.perf_counter()
            list(pool.map(lambda chunk: products.bulk_write(chunk, ordered=False), chunks))
            return time.perf_counter() - started


def _ids(s: Settings) -> dict[int, object]:
    with open_pipeline(s) as pipeline:
        return {d["product_id"]: d["_id"] for d in pipeline.inventory.products.find({})}


def mongodb_aggregated(s: Settings, orders: Sequence[Order]) -> float:
    """Orders per second when each product gets one ``$inc`` of its orders' total."""
    ids = _ids(s)
    totals: Counter[int] = Counter()
    for order in orders:
        totals[order.product_id] += order.quantity
    ops = [UpdateOne({"_id": ids[pid]}, {"$inc": {"stock": -qty}}) for pid, qty in totals.items()]
    return len(orders) / _apply(s, ops)


def mongodb_per_order(s: Settings, orders: Sequence[Order]) -> float:
    """Orders per second when each order is its own guarded ``$inc``."""
    ids = _ids(s)
    ops = [
        UpdateOne(
            {"_id": ids[o.product_id], "stock": {"$gte": o.quantity}},
            {"$inc": {"stock": -o.quantity}},
        )
        for o in orders
    ]
    return len(orders) / _apply(s, ops)
