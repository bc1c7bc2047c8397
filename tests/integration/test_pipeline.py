"""The seed's pipeline on the real Kafka, MongoDB-compatible server and Redis."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import pytest
from confluent_kafka import Producer

from stockflow.config import Settings
from stockflow.inventory import DEMO_PRODUCTS
from stockflow.orders import Order
from stockflow.outcomes import Outcome
from stockflow.pipeline import Pipeline
from stockflow.producer import OrderProducer
from tests.integration.conftest import consume


def send(settings: Settings, *orders: Order) -> None:
    with OrderProducer(settings) as producer:
        for order in orders:
            producer.send(order)


def test_seed_orders_take_stock_from_100_to_99_to_96(
    settings: Settings, pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline.inventory.seed(DEMO_PRODUCTS)
    send(settings, Order(order_id=1, product_id=101, quantity=1))
    with caplog.at_level(logging.INFO, logger="stockflow"):
        stats = consume(settings, pipeline, 1)
    assert stats.outcomes == {Outcome.APPLIED: 1}
    assert pipeline.inventory.stock_of(101) == 99

    send(settings, Order(order_id=3, product_id=101, quantity=3))
    with caplog.at_level(logging.INFO, logger="stockflow"):
        consume(settings, pipeline, 1)
    assert pipeline.inventory.stock_of(101) == 96
    assert caplog.messages == [
        "Processing order for product 101, quantity: 1",
        "Product stock updated for product 101, new stock: 99",
        "Processing order for product 101, quantity: 3",
        "Product stock updated for product 101, new stock: 96",
    ]


def test_order_beyond_stock_changes_nothing(
    settings: Settings, pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline.inventory.seed({101: 5, 102: 7})
    send(settings, Order(order_id=9, product_id=101, quantity=6))
    with caplog.at_level(logging.INFO, logger="stockflow"):
        stats = consume(settings, pipeline, 1)
    assert stats.outcomes == {Outcome.INSUFFICIENT_STOCK: 1}
    assert pipeline.inventory.stock_of(101) == 5
    assert pipeline.inventory.stock_of(102) == 7
    assert any(m.startswith("Insufficient stock for product 101") for m in caplog.messages)


def test_exact_stock_can_be_sold_down_to_zero_and_no_further(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 3})
    send(
        settings,
        Order(order_id=1, product_id=101, quantity=3),
        Order(order_id=2, product_id=101, quantity=1),
    )
    stats = consume(settings, pipeline, 2)
    assert stats.outcomes == {Outcome.APPLIED: 1, Outcome.INSUFFICIENT_STOCK: 1}
    assert pipeline.inventory.stock_of(101) == 0


def test_unknown_product_is_rejected_and_creates_nothing(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10})
    send(settings, Order(order_id=1, product_id=999, quantity=1))
    stats = consume(settings, pipeline, 1)
    assert stats.outcomes == {Outcome.UNKNOWN_PRODUCT: 1}
    assert pipeline.inventory.find_product(999) is None


def test_cache_is_filled_on_miss_served_on_hit_and_dropped_after_update(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    key = f"{settings.cache_key_prefix}101"
    cache, redis = pipeline.cache, pipeline.redis
    assert redis.get(key) is None

    product = pipeline.processor.lookup(101)  # miss: MongoDB, then fill
    assert product is not None and product["stock"] == 100
    assert json.loads(redis.get(key) or b"{}") == {"product_id": 101, "stock": 100}
    assert (cache.hits, cache.misses) == (0, 1)

    # A hit is served from Redis: prove it by making Redis disagree with MongoDB.
    redis.set(key, json.dumps({"product_id": 101, "stock": 12345}))
    assert pipeline.processor.lookup(101) == {"product_id": 101, "stock": 12345}
    assert (cache.hits, cache.misses) == (1, 1)

    redis.set(key, json.dumps({"product_id": 101, "stock": 100}))
    send(settings, Order(order_id=1, product_id=101, quantity=4))
    consume(settings, pipeline, 1)
    assert redis.get(key) is None  # invalidated by the update
    assert pipeline.processor.lookup(101) == {"product_id": 101, "stock": 96}


def test_plain_json_without_key_from_a_raw_producer_is_consumed(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.topic, b'{"orderId": 77, "productId": 101, "quantity": 2}')
    assert producer.flush(10) == 0
    stats = consume(settings, pipeline, 1)
    assert stats.outcomes == {Outcome.APPLIED: 1}
    assert pipeline.inventory.stock_of(101) == 98


def test_messages_written_by_kcat_are_consumed(settings: Settings, pipeline: Pipeline) -> None:
    kcat = shutil.which("kcat")
    if kcat is None:
        pytest.skip("kcat is not installed (make system-deps installs it)")
    pipeline.inventory.seed({101: 100, 102: 50})
    lines = (
        '{"orderId":1,"productId":101,"quantity":5}\n{"orderId":"x","productId":102,"quantity":1}\n'
    )
    subprocess.run(
        [kcat, "-P", "-b", settings.kafka_bootstrap, "-t", settings.topic],
        input=lines.encode(),
        check=True,
        timeout=30,
    )
    stats = consume(settings, pipeline, 2)
    assert stats.outcomes == {Outcome.APPLIED: 2}
    assert (pipeline.inventory.stock_of(101), pipeline.inventory.stock_of(102)) == (95, 49)


def test_an_invalid_message_is_skipped_and_the_next_order_applied(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10})
    with OrderProducer(settings) as producer:
        producer.send_raw(b'{"orderId": 1, "productId": {"$gt": 0}, "quantity": 1}')
        producer.send_raw(b"\xff\xfe not utf-8")
        producer.send(Order(order_id=2, product_id=101, quantity=1))
    stats = consume(settings, pipeline, 3)
    assert stats.outcomes == {Outcome.INVALID: 2, Outcome.APPLIED: 1}
    assert pipeline.inventory.stock_of(101) == 9


def test_a_restarted_consumer_resumes_after_the_last_processed_order(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    send(settings, *(Order(order_id=i, product_id=101, quantity=1) for i in range(5)))
    assert consume(settings, pipeline, 2).messages == 2
    assert consume(settings, pipeline, 3).messages == 3
    assert consume(settings, pipeline, 1, timeout=3).messages == 0
    assert pipeline.inventory.stock_of(101) == 95
