"""The seed's consumer, ported faithfully to Python: the baseline of the benchmark.

The seed (a Node.js learning project) handles one message at a time with auto-committed
offsets: read the product through the Redis cache (``product_<id>``; on a miss ``findOne`` and
fill the cache), compute the new stock, ``updateOne`` with ``$set`` if it does not go below
zero, then delete the cache entry. Same client libraries as stockflow (confluent-kafka,
pymongo, redis-py), same servers. Nothing here is used by stockflow itself.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import redis
from confluent_kafka import Consumer
from pymongo.collection import Collection

from stockflow.config import Settings

log = logging.getLogger("bench.baseline")


@dataclass
class BaselineRun:
    """What the port consumed, and when its first and last message was done."""

    processed: int = 0
    applied: int = 0
    insufficient: int = 0
    first_done: float = 0.0
    last_done: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def orders_per_s(self) -> float:
        span = self.last_done - self.first_done
        return (self.processed - 1) / span if span > 0 and self.processed > 1 else 0.0


def run_baseline(
    settings: Settings,
    products: Collection[dict[str, object]],
    cache: redis.Redis,
    *,
    group_id: str,
    max_messages: int,
    max_seconds: float,
) -> BaselineRun:
    """Consume the topic as the seed does until ``max_messages`` or ``max_seconds`` of work."""
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": group_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,  # the seed relies on kafkajs' auto-commit
            }
        )
    )
    consumer.subscribe([settings.topic])
    run = BaselineRun()
    deadline: float | None = None
    try:
        while run.processed < max_messages and (deadline is None or time.time() < deadline):
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                continue
            _handle(message.value(), products, cache, settings.cache_key_prefix, run)
            run.processed += 1
            now = time.time()
            if run.processed == 1:
                run.first_done = now
                deadline = now + max_seconds
            run.last_done = now
    finally:
        consumer.close()
    return run


def _handle(
    raw: bytes | None,
    products: Collection[dict[str, object]],
    cache: redis.Redis,
    prefix: str,
    run: BaselineRun,
) -> None:
    order = json.loads(raw or b"{}")
    product_id, quantity = order["productId"], order["quantity"]
    log.info("Processing order for product %s, quantity: %s", product_id, quantity)
    key = f"{prefix}{product_id}"
    cached = cache.get(key)
    if cached is not None:
        product = json.loads(cached)
    else:
        product = products.find_one({"product_id": product_id}, {"_id": 0})
        if product is None:
            run.errors.append(f"product {product_id} not found")
            return
        cache.set(key, json.dumps(product, default=str))
    new_stock = int(product["stock"]) - quantity  # type: ignore[call-overload]
    if new_stock >= 0:
        products.update_one({"product_id": product_id}, {"$set": {"stock": new_stock}})
        cache.delete(key)
        run.applied += 1
        log.info("Product stock updated for product %s, new stock: %s", product_id, new_stock)
    else:
        run.insufficient += 1
        log.info("Insufficient stock for product %s", product_id)
