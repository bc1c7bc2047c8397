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
from stockflow.orders import Order, Restock
from stockflow.outcomes import Outcome
from stockflow.pipeline import Pipeline
from stockflow.producer import OrderProducer
from tests.integration.conftest import outcome_events, process, read_topic


def send(settings: Settings, *commands: Order | Restock) -> None:
    with OrderProducer(settings) as producer:
        for command in commands:
            producer.send_raw(command.encode(), key=command.key)


def test_seed_orders_take_stock_from_100_to_99_to_96(
    settings: Settings, pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline.inventory.seed(DEMO_PRODUCTS)
    send(settings, Order(order_id=1, product_id=101, quantity=1))
    with caplog.at_level(logging.INFO, logger="stockflow.orders"):
        run = process(settings, pipeline, 1)
    assert run.outcomes == {"applied": 1}
    assert pipeline.inventory.stock_of(101) == 99

    send(settings, Order(order_id=3, product_id=101, quantity=3))
    with caplog.at_level(logging.INFO, logger="stockflow.orders"):
        process(settings, pipeline, 1)
    assert pipeline.inventory.stock_of(101) == 96
    assert [r.message for r in caplog.records if r.name == "stockflow.orders"] == [
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
    with caplog.at_level(logging.INFO, logger="stockflow.orders"):
        run = process(settings, pipeline, 1)
    assert run.outcomes == {"insufficient_stock": 1}
    assert pipeline.inventory.stock_of(101) == 5
    assert pipeline.inventory.stock_of(102) == 7
    assert any(m.startswith("Insufficient stock for product 101") for m in caplog.messages)


def test_exact_stock_sells_down_to_zero_and_no_further(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 3})
    send(
        settings,
        Order(order_id=1, product_id=101, quantity=3),
        Order(order_id=2, product_id=101, quantity=1),
    )
    run = process(settings, pipeline, 2)
    assert run.outcomes == {"applied": 1, "insufficient_stock": 1}
    assert pipeline.inventory.stock_of(101) == 0


def test_unknown_product_is_rejected_and_creates_nothing(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10})
    send(settings, Order(order_id=1, product_id=999, quantity=1))
    assert process(settings, pipeline, 1).outcomes == {"unknown_product": 1}
    assert pipeline.inventory.find_product(999) is None


def test_cache_is_filled_on_miss_served_on_hit_and_refreshed_after_update(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    key = f"{settings.cache_key_prefix}101"
    cache, redis = pipeline.cache, pipeline.redis
    assert redis.get(key) is None

    product = pipeline.reader.lookup(101)  # miss: MongoDB, then fill
    assert product == {"product_id": 101, "stock": 100}
    assert json.loads(redis.get(key) or b"{}")["stock"] == 100
    assert (cache.hits, cache.misses) == (0, 1)

    # A hit is served from Redis: prove it by making Redis disagree with MongoDB.
    redis.set(key, json.dumps({"product_id": 101, "stock": 12345, "_v": -1}))
    assert pipeline.reader.lookup(101) == {"product_id": 101, "stock": 12345}
    assert (cache.hits, cache.misses) == (1, 1)

    send(settings, Order(order_id=1, product_id=101, quantity=4))
    process(settings, pipeline, 1)
    # The writer refreshed the entry after its change: no stale 12345, no extra miss.
    assert pipeline.reader.lookup(101) == {"product_id": 101, "stock": 96}


def test_a_reader_that_loaded_before_a_change_cannot_put_old_stock_back(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    stale = pipeline.inventory.products.find_one({"product_id": 101})
    assert stale is not None
    send(settings, Order(order_id=1, product_id=101, quantity=10))
    process(settings, pipeline, 1)
    pipeline.cache.put(101, stale)  # the slow reader's fill arrives after the writer's refresh
    assert pipeline.reader.lookup(101) == {"product_id": 101, "stock": 90}


def test_plain_json_without_key_from_a_raw_producer_is_consumed(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.topic, b'{"orderId": 77, "productId": 101, "quantity": 2}')
    assert producer.flush(10) == 0
    assert process(settings, pipeline, 1).outcomes == {"applied": 1}
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
    assert process(settings, pipeline, 2).outcomes == {"applied": 2}
    assert (pipeline.inventory.stock_of(101), pipeline.inventory.stock_of(102)) == (95, 49)


def test_restock_travels_the_order_path_and_has_an_outcome(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 2})
    send(
        settings,
        Order(order_id=1, product_id=101, quantity=5),
        Restock(restock_id="r-1", product_id=101, quantity=10),
        Order(order_id=2, product_id=101, quantity=5),
    )
    run = process(settings, pipeline, 3)
    assert [(d.entry.command.kind, d.outcome, d.stock_after) for d in run.decisions] == [
        ("order", Outcome.INSUFFICIENT_STOCK, 2),
        ("restock", Outcome.APPLIED, 12),
        ("order", Outcome.APPLIED, 7),
    ]
    assert pipeline.inventory.stock_of(101) == 7


def test_outcomes_are_published_and_recorded(settings: Settings, pipeline: Pipeline) -> None:
    pipeline.inventory.seed({101: 10})
    send(
        settings,
        Order(order_id="a", product_id=101, quantity=4),
        Order(order_id="b", product_id=101, quantity=40),
    )
    send(settings, Restock(restock_id="r", product_id=101, quantity=1))
    process(settings, pipeline, 3)
    # Ids are named as the input names them.
    raw = [json.loads(m.value()) for m in read_topic(settings, settings.outcomes_topic)]  # type: ignore[attr-defined]
    assert sorted((e["kind"], e.get("orderId"), e.get("restockId")) for e in raw) == [
        ("order", "a", None),
        ("order", "b", None),
        ("restock", None, "r"),
    ]
    assert all("id" not in e for e in raw)
    events = {e.ident: e for e in outcome_events(settings)}
    assert events["r"].restock_id == "r" and events["r"].order_id is None
    assert events["a"].status is Outcome.APPLIED and events["a"].stock_after == 6
    assert events["b"].status is Outcome.INSUFFICIENT_STOCK and events["b"].stock_after == 6
    assert events["a"].source is not None and events["a"].source.topic == settings.topic
    orders = pipeline.mongo[settings.database][settings.orders_collection]
    record = orders.find_one({"_id": "a"})
    assert record is not None
    assert (record["orderId"], record["status"], record["stockAfter"]) == ("a", "applied", 6)
