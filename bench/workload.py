"""Generated workloads: orders over a product catalogue with Zipf, uniform or one-hot popularity."""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from dataclasses import dataclass

from stockflow.config import Settings
from stockflow.orders import Order
from stockflow.pipeline import open_pipeline
from stockflow.producer import OrderProducer
from stockflow.topics import create_topic, delete_topics

STOCK = 10**6
"""Every product's starting stock: enough that no workload runs out (every order is a write)."""
PARTITIONS = 6
log = logging.getLogger("bench")


HEADLINE_ORDERS = 200_000
HEADLINE_PRODUCTS = 10_000


def scaled(n: int, quick: bool) -> int:
    """``n`` for a full run; for ``--quick``, a hundredth (at least 500)."""
    return max(500, n // 100) if quick else n


@dataclass(frozen=True)
class Workload:
    name: str
    orders: int
    products: int
    popularity: str = "zipf"
    """``zipf`` (s = ``zipf_s``), ``uniform`` or ``hot`` (every order for one product)."""
    zipf_s: float = 1.1
    seed: int = 42

    def product_ids(self) -> list[int]:
        rng = random.Random(self.seed)
        if self.popularity == "hot":
            return [1] * self.orders
        if self.popularity == "uniform":
            return [rng.randint(1, self.products) for _ in range(self.orders)]
        weights = [1 / rank**self.zipf_s for rank in range(1, self.products + 1)]
        cumulative = list(itertools.accumulate(weights))
        ranks = rng.choices(range(1, self.products + 1), cum_weights=cumulative, k=self.orders)
        # Shuffle which product id is popular, so popularity is not id order.
        ids = list(range(1, self.products + 1))
        rng.shuffle(ids)
        return [ids[rank - 1] for rank in ranks]

    def orders_list(self, prefix: str = "") -> list[Order]:
        rng = random.Random(self.seed + 1)
        return [
            Order(f"{prefix}{i}", pid, rng.randint(1, 3))
            for i, pid in enumerate(self.product_ids())
        ]


def isolated(base: Settings, label: str, **overrides: object) -> Settings:
    """Settings with a topic, database, group and cache prefix of their own."""
    tag = f"{label}-{uuid.uuid4().hex[:6]}"
    return base.model_copy(
        update={
            "topic": f"bench-{tag}",
            "database": f"bench_{tag.replace('-', '_')}",
            "group_id": f"bench-{tag}",
            "cache_key_prefix": f"bench_{tag}_product_",
            "commands_partitions": PARTITIONS,
            **overrides,
        }
    )


def preload(s: Settings, orders: list[Order]) -> None:
    """Create the topic (six partitions) and write every order to it before anyone consumes."""
    create_topic(s, s.topic, partitions=PARTITIONS)
    with OrderProducer(s, **{"linger.ms": 50, "batch.num.messages": 10_000}) as producer:
        for order in orders:
            producer.send(order)


def seed_products(s: Settings, products: int) -> None:
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed(dict.fromkeys(range(1, products + 1), STOCK))


def drop(s: Settings) -> None:
    """Remove a run's database and cache entries (the topics stay: Kafka deletes are slow)."""
    with open_pipeline(s, check=False) as pipeline:
        pipeline.mongo.drop_database(s.database)
        keys = list(pipeline.redis.scan_iter(match=f"{s.cache_key_prefix}*", count=10_000))
        for start in range(0, len(keys), 5000):
            pipeline.redis.delete(*keys[start : start + 5000])


def delete_run_topics(s: Settings, *, with_input: bool = True) -> None:
    """Delete a run's commands, outcomes and dead-letter topics, and its input topic unless
    told not to (one shared by other runs), if it can."""
    names = [s.commands_topic, s.outcomes_topic, s.dlq_topic]
    if with_input:
        names.insert(0, s.topic)
    try:
        delete_topics(s, names)
    except Exception as exc:  # deleting is tidying up, never a failed benchmark
        log.warning("could not delete %s: %s", names, exc)


def headline_workload(popularity: str, *, quick: bool) -> Workload:
    """The benchmark's throughput workload of this popularity (``zipf``, ``uniform``, ``hot``):
    anyone who makes it gets the same orders."""
    return Workload(
        popularity,
        scaled(HEADLINE_ORDERS, quick),
        scaled(HEADLINE_PRODUCTS, quick),
        popularity=popularity,
    )
