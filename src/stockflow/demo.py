"""The seed's story end to end, on whatever stack the settings point at.

It resets only the demo's own data (the demo products' stock, their cache entries, and the
records of the demo's own order ids on product 101) and uses a consumer group of its own that
starts at the end of the topics, so it can be run again and again and tells the same story:
100 -> 99 -> 96, then an order beyond stock that changes nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from stockflow.config import Settings
from stockflow.errors import StockflowError
from stockflow.inventory import DEMO_PRODUCTS
from stockflow.ledger import Ledger
from stockflow.orders import Order
from stockflow.outcomes import Outcome
from stockflow.pipeline import open_pipeline
from stockflow.planner import Decision
from stockflow.producer import OrderProducer
from stockflow.topics import create_topic
from stockflow.worker import Worker, WorkerStats, ensure_topics

log = logging.getLogger("stockflow.demo")

DEMO_ORDERS = (
    Order(order_id=1, product_id=101, quantity=1),
    Order(order_id=3, product_id=101, quantity=3),
    Order(order_id=4, product_id=101, quantity=1000),
)
"""The seed's two example orders, then one that exceeds the stock."""


@dataclass
class DemoResult:
    """Stock of product 101 before and after each order, and the worker's counts."""

    stocks: list[int]
    outcomes: list[Outcome]
    stats: WorkerStats


def _await(decisions: queue.Queue[Decision], errors: list[BaseException], order: Order) -> Decision:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if errors:
            raise errors[0]
        try:
            decision = decisions.get(timeout=0.1)
        except queue.Empty:
            continue
        if decision.entry.command == order:
            return decision
    raise StockflowError(f"order {order.order_id} was sent but not processed within 60s")


def run_demo(settings: Settings, say: Callable[[str], None]) -> DemoResult:
    """Reset the demo products, start a worker, send the orders one by one, report the stock."""
    # A group of the demo's own, started at the topics' ends: only the demo's messages count.
    settings = settings.model_copy(update={"group_id": f"stockflow-demo-{int(time.time())}"})
    if create_topic(settings, settings.topic, partitions=1):
        say(f"Created topic {settings.topic}")
    ensure_topics(settings)
    with open_pipeline(settings) as pipeline:
        pipeline.inventory.seed(DEMO_PRODUCTS)
        ledger = Ledger(
            pipeline.mongo[settings.database],
            settings.orders_collection,
            settings.restocks_collection,
        )
        ledger.archive("order", [o.order_id for o in DEMO_ORDERS], product_id=101)
        for pid in DEMO_PRODUCTS:
            pipeline.cache.invalidate(pid)
        start = pipeline.inventory.stock_of(101)
        assert start is not None
        say(f"Seeded {len(DEMO_PRODUCTS)} demo products; product 101 has stock {start}")

        decisions: queue.Queue[Decision] = queue.Queue()
        worker = Worker(settings, pipeline, listener=decisions.put, start_at_end=True)
        errors: list[BaseException] = []
        stats: list[WorkerStats] = []

        def work() -> None:
            try:
                stats.append(worker.run())
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

        thread = threading.Thread(target=work, name="demo-worker", daemon=True)
        thread.start()
        if not worker.wait_assigned(60) or errors:
            worker.stop()
            raise StockflowError(f"the demo worker did not join its groups: {errors or 'timeout'}")

        stocks = [start]
        outcomes = []
        try:
            with OrderProducer(settings) as producer:
                for order in DEMO_ORDERS:
                    say(f"Sending order {order.encode().decode()}")
                    producer.send(order)
                    producer.flush()
                    outcomes.append(_await(decisions, errors, order).outcome)
                    stocks.append(pipeline.inventory.stock_of(101) or 0)
        finally:
            worker.stop()
            thread.join(30)
        if errors:
            raise errors[0]
        final = pipeline.reader.lookup(101)
        say(
            f"Final stock of product 101: {final['stock'] if final else '?'} "
            f"({' -> '.join(str(s) for s in stocks)})"
        )
        return DemoResult(stocks, outcomes, stats[0] if stats else WorkerStats())
