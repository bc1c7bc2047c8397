"""Every partitioning strategy on the real Kafka: orders land where the strategy promises (read
back with a consumer), and stock stays right when they are consumed by two workers.

Orders spread over the input partitions (customer, round-robin) are read by different routers;
the router re-keys them by product, so each product still has one applier: no oversell. Copies
(broadcast) are decided once, the others are ``duplicate``. The 50,000-order version with three
worker processes is in tests/chaos.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import pytest

from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.orders import Order, decode_order
from stockflow.partitioning import Partitioner, make_partitioner
from stockflow.pipeline import open_pipeline
from stockflow.planner import Decision
from stockflow.producer import OrderProducer
from stockflow.worker import Worker
from tests.integration.conftest import cleanup, isolated, read_topic

PARTITIONS = 6
ORDERS = 300
PRODUCTS = {101: 40, 102: 40, 103: 40}


@pytest.fixture
def six(stack_settings: Settings) -> Iterator[Settings]:
    s = isolated(stack_settings, partitions=PARTITIONS)
    yield s
    cleanup(s)


def make_orders(count: int, seed: int = 3) -> list[Order]:
    """Orders for three products (far more than their stock), half of them with a customer."""
    rng = random.Random(seed)
    return [
        Order(
            f"o{i}",
            rng.choice(list(PRODUCTS)),
            rng.randint(1, 3),
            f"c{rng.randint(1, 7)}" if i % 2 else None,
        )
        for i in range(count)
    ]


def send(s: Settings, strategy: Partitioner, orders: list[Order]) -> dict[str, list[int]]:
    """Send through OrderProducer; each order's partitions as the delivery reports say."""
    placed: dict[str, list[int]] = defaultdict(list)
    with OrderProducer(s, partitioner=strategy) as producer:
        for order in orders:
            producer.send(order, on_partition=placed[str(order.order_id)].append)
    return placed


def consume_with_workers(s: Settings, expect: int, workers: int = 2, timeout: float = 90) -> int:
    """Run ``workers`` workers side by side until ``expect`` commands are decided."""
    decided: list[Decision] = []
    lock = threading.Lock()

    def listen(decision: Decision) -> None:
        with lock:
            decided.append(decision)

    with open_pipeline(s) as pipeline:
        pool = [Worker(s, pipeline, listener=listen) for _ in range(workers)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in pool]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        while len(decided) < expect and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # a second decision of anything would come now
        for w in pool:
            w.stop()
        for thread in threads:
            thread.join(30)
    return len(decided)


Check = Callable[[list[Order], dict[str, list[int]]], None]


def by_product(orders: list[Order], where: dict[str, list[int]]) -> None:
    homes = defaultdict(set)
    for order in orders:
        homes[order.product_id].update(where[str(order.order_id)])
    assert all(len(p) == 1 for p in homes.values()), homes


def all_on_4(orders: list[Order], where: dict[str, list[int]]) -> None:
    assert {p for ps in where.values() for p in ps} == {4}


def evenly(orders: list[Order], where: dict[str, list[int]]) -> None:
    used = Counter(p for ps in where.values() for p in ps)
    assert set(used) == set(range(PARTITIONS)) and max(used.values()) - min(used.values()) <= 1
    one_product = {p for o in orders if o.product_id == 101 for p in where[str(o.order_id)]}
    assert one_product == set(range(PARTITIONS))


def by_customer(orders: list[Order], where: dict[str, list[int]]) -> None:
    homes = defaultdict(set)
    for order in orders:
        owner = (
            f"customer {order.customer_id}" if order.customer_id else f"product {order.product_id}"
        )
        homes[owner].update(where[str(order.order_id)])
    assert all(len(p) == 1 for p in homes.values()), homes
    one_product = {p for o in orders if o.product_id == 101 for p in where[str(o.order_id)]}
    assert len(one_product) > 1, "customers did not spread product 101 over partitions"


def to_0_2_5(orders: list[Order], where: dict[str, list[int]]) -> None:
    assert all(sorted(ps) == [0, 2, 5] for ps in where.values())


STRATEGIES: list[tuple[str, dict[str, object], Check, int]] = [
    ("product", {}, by_product, 1),
    ("partition", {"partition": 4}, all_on_4, 1),
    ("round-robin", {}, evenly, 1),
    ("customer", {}, by_customer, 1),
    ("broadcast", {"partitions": "0,2,5"}, to_0_2_5, 3),
]


@pytest.mark.parametrize(
    ("name", "options", "promise", "copies"),
    STRATEGIES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_each_strategy_sends_where_it_promises_and_stock_stays_right(
    six: Settings,
    name: str,
    options: dict[str, object],
    promise: Check,
    copies: int,
) -> None:
    s = six
    orders = make_orders(ORDERS)
    reported = send(s, make_partitioner(name, **options), orders)  # type: ignore[arg-type]
    # Read back: what the topic holds is what the delivery reports said, and keeps its promise.
    read: dict[str, list[int]] = defaultdict(list)
    for message in read_topic(s, s.topic):
        order = decode_order(message.value())  # type: ignore[attr-defined]
        read[str(order.order_id)].append(message.partition())  # type: ignore[attr-defined]
    assert {k: sorted(v) for k, v in read.items()} == {k: sorted(v) for k, v in reported.items()}
    assert sum(len(v) for v in read.values()) == ORDERS * copies
    promise(orders, read)

    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed(PRODUCTS)
    decided = consume_with_workers(s, ORDERS * copies)
    assert decided == ORDERS * copies
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
        negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
    assert report.ok, report
    assert negative == 0
    assert report.messages_checked == ORDERS * copies
    assert report.outcomes["duplicate"] == ORDERS * (copies - 1)
    # The books: every applied order's quantity left the stock, and the stock ran out.
    assert report.outcomes["applied"] + report.outcomes["insufficient_stock"] == ORDERS
    assert report.outcomes["insufficient_stock"] > 0


def stockflow(s: Settings, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockflow", *args],
        input=stdin,
        env={**os.environ, **s.worker_environment()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_produce_partitioner_prints_where_each_order_went(six: Settings) -> None:
    lines = "".join(
        f'{{"orderId": {i}, "productId": {101 + i % 2}, "quantity": 1, "customerId": "c{i % 3}"}}\n'
        for i in range(1, 7)
    )
    printed: dict[int, list[int]] = {}
    for options in (["broadcast", "--partitions", "0,2,5"], ["round-robin"], ["customer"]):
        result = stockflow(six, "produce", "--file", "-", "--partitioner", *options, stdin=lines)
        assert result.returncode == 0, result.stderr
        shown = re.findall(r"order \d+ \(orderId (\d+)\) -> partitions? ([\d, ]+)", result.stdout)
        assert len(shown) == 6, result.stdout
        for order_id, where in shown:
            printed.setdefault(int(order_id), []).extend(int(p) for p in where.split(","))
    read: dict[int, list[int]] = defaultdict(list)
    for message in read_topic(six, six.topic):
        order = decode_order(message.value())  # type: ignore[attr-defined]
        read[int(order.order_id)].append(message.partition())  # type: ignore[attr-defined]
    assert {k: sorted(v) for k, v in read.items()} == {k: sorted(v) for k, v in printed.items()}
    assert all(len(v) == 5 for v in read.values())  # three broadcast copies, two single sends


def test_produce_to_a_partition_the_topic_lacks_is_one_line_and_sends_nothing(
    six: Settings,
) -> None:
    order = '{"orderId": 1, "productId": 101, "quantity": 1}'
    for options in (["partition", "--partition", "6"], ["broadcast", "--partitions", "1,9"]):
        result = stockflow(six, "produce", order, "--partitioner", *options)
        assert result.returncode == 1
        assert "does not exist: the topic has 6" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    wrong = stockflow(six, "produce", order, "--partitioner", "partition")
    assert wrong.returncode == 1 and "needs --partition N" in wrong.stderr
    assert read_topic(six, six.topic, timeout=3) == []
