"""The seed's story end to end, on whatever stack the settings point at.

It resets only the demo's own data (the demo products' stock and their cache entries) and
reads only the messages it produced itself, so it can be run again and again and tells the
same story: 100 -> 99 -> 96, then an order beyond stock that changes nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Message

from stockflow.config import Settings
from stockflow.consumer import OrderConsumer, RunStats
from stockflow.errors import StockflowError
from stockflow.inventory import DEMO_PRODUCTS
from stockflow.orders import Order
from stockflow.outcomes import OrderResult
from stockflow.pipeline import open_pipeline
from stockflow.producer import OrderProducer
from stockflow.topics import create_topic, end_offsets

log = logging.getLogger("stockflow.demo")

DEMO_ORDERS = (
    Order(order_id=1, product_id=101, quantity=1),
    Order(order_id=3, product_id=101, quantity=3),
    Order(order_id=4, product_id=101, quantity=1000),
)
"""The seed's two example orders, then one that exceeds the stock."""
DEMO_GROUP = "stockflow-demo"


@dataclass
class DemoResult:
    """Stock of product 101 before and after each order, and the consumer's counts."""

    stocks: list[int]
    results: list[OrderResult]
    stats: RunStats


def _await_result(
    results: queue.Queue[OrderResult], errors: list[BaseException], order: Order
) -> OrderResult:
    """The consumer's result for ``order``; re-raises the consumer's error if it failed."""
    for _ in range(600):
        if errors:
            raise errors[0]
        try:
            return results.get(timeout=0.1)
        except queue.Empty:
            continue
    raise StockflowError(f"order {order.order_id} was sent but not processed within 60s")


def run_demo(settings: Settings, say: Callable[[str], None]) -> DemoResult:
    """Reset the demo products, run a consumer, send the orders one by one, report the stock."""
    topic = settings.topic
    if create_topic(settings, topic, partitions=1, replication=1):
        say(f"Created topic {topic}")
    with open_pipeline(settings) as pipeline:
        pipeline.inventory.seed(DEMO_PRODUCTS)
        for pid in DEMO_PRODUCTS:
            pipeline.cache.invalidate(pid)
        start = pipeline.inventory.stock_of(101)
        assert start is not None
        say(f"Seeded {len(DEMO_PRODUCTS)} demo products; product 101 has stock {start}")

        results: queue.Queue[OrderResult] = queue.Queue()

        def on_result(_: Message, result: OrderResult) -> None:
            results.put(result)

        consumer = OrderConsumer(
            settings,
            pipeline.processor,
            topic=topic,
            group_id=DEMO_GROUP,
            start_offsets=end_offsets(settings, topic),
            on_result=on_result,
        )
        stats: list[RunStats] = []
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                stats.append(consumer.run(max_messages=len(DEMO_ORDERS), idle_timeout=60))
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)
                consumer.assigned.set()

        thread = threading.Thread(target=consume, name="demo-consumer", daemon=True)
        thread.start()
        if not consumer.assigned.wait(60) or errors:
            consumer.stop()
            raise StockflowError(f"the demo consumer did not join its group: {errors or 'timeout'}")

        stocks = [start]
        collected = []
        with OrderProducer(settings, topic=topic) as producer:
            for order in DEMO_ORDERS:
                say(f"Sending order {order.encode().decode()}")
                producer.send(order)
                producer.flush()
                collected.append(_await_result(results, errors, order))
                stocks.append(pipeline.inventory.stock_of(101) or 0)
        thread.join(30)
        if errors:
            raise errors[0]
        final = pipeline.processor.lookup(101)
        say(
            f"Final stock of product 101: {final['stock'] if final else '?'} "
            f"({' -> '.join(str(s) for s in stocks)})"
        )
        return DemoResult(stocks, collected, stats[0] if stats else RunStats())
