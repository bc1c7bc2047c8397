"""The database behind FerretDB going away is an outage, never a dead letter, and never a hang.

These tests break PostgreSQL, so they run a private FerretDB + PostgreSQL of their own (own
ports and state: ``stockflow.testing.PrivateDatabase``), never the shared stack. The applier's
batch must fail with TransientError (the loop then pauses and retries for as long as it takes)
both when PostgreSQL is stopped (FerretDB answers at once with an InternalError) and when it
hangs (FerretDB answers nothing: only the client's deadline ends the call), and go through
once PostgreSQL is back.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from confluent_kafka import Message
from pydantic import SecretStr
from pymongo.errors import NetworkTimeout, OperationFailure

from stockflow.applier import Applier
from stockflow.cache import ProductCache
from stockflow.config import Settings
from stockflow.errors import TransientError
from stockflow.inventory import Inventory
from stockflow.ledger import Ledger
from stockflow.mongo import mongo_client
from stockflow.orders import Order
from stockflow.outcomes import Outcome
from stockflow.pipeline import open_pipeline
from stockflow.planner import Decision
from stockflow.producer import OrderProducer
from stockflow.testing import PrivateDatabase, private_database
from stockflow.topics import delete_topics
from stockflow.worker import Worker
from tests.integration.conftest import isolated, read_topic

DEADLINE_MS = 2000


@pytest.fixture
def private(tmp_path: Path) -> Iterator[PrivateDatabase]:
    if os.environ.get("MONGODB_URI"):
        pytest.skip("MONGODB_URI is set: this test needs a local FerretDB it may break")
    with private_database(
        tmp_path / "state", database="outage", mongodb_socket_timeout_ms=DEADLINE_MS
    ) as database:
        yield database


@contextmanager
def _applier(settings: Settings) -> Iterator[tuple[Applier, Inventory]]:
    client = mongo_client(settings)
    # Nothing listens on port 9: the cache is unavailable, which the applier tolerates.
    cache_client = redis.Redis(port=9, socket_connect_timeout=0.2)
    try:
        with ThreadPoolExecutor(4) as pool:
            inventory = Inventory.from_settings(settings, client, pool=pool)
            ledger = Ledger(client[settings.database], "orders", "restocks", pool=pool)
            cache = ProductCache(cache_client, prefix="outage_")
            yield Applier(settings, inventory, ledger, cache), inventory
    finally:
        client.close()
        cache_client.close()


def _order(order_id: int) -> list[Message]:
    order = Order(order_id=order_id, product_id=101, quantity=1)
    return [Message(topic="t.by-product", partition=0, offset=order_id, value=order.encode())]


def test_postgres_stopped_behind_ferretdb_is_transient(private: PrivateDatabase) -> None:
    with _applier(private.settings) as (applier, inventory):
        inventory.seed({101: 10})
        private.postgres.stop()
        for attempt in range(3):  # every retry of the outage is transient, not just the first
            with pytest.raises(TransientError) as caught:
                applier.handle(_order(1))
            assert isinstance(caught.value.__cause__, OperationFailure), attempt
            assert caught.value.__cause__.code == 1  # FerretDB's InternalError
            assert "InternalError" in str(caught.value)  # named by its code, not its text
        private.start_postgres()
        handled = applier.handle(_order(1))
        assert handled.counts == {Outcome.APPLIED.value: 1}
        assert inventory.stock_of(101) == 9


@pytest.mark.timeout(90)
def test_postgres_hung_behind_ferretdb_times_out_as_transient(private: PrivateDatabase) -> None:
    with _applier(private.settings) as (applier, inventory):
        inventory.seed({101: 10})
        with private.hang_postgres():
            began = time.monotonic()
            with pytest.raises(TransientError) as caught:
                applier.handle(_order(1))
            took = time.monotonic() - began
        assert isinstance(caught.value.__cause__, NetworkTimeout)
        # One deadline (plus scheduling slack on a busy machine), not forever.
        assert took < DEADLINE_MS / 1000 + 5, took
        handled = applier.handle(_order(1))
        assert handled.counts == {Outcome.APPLIED.value: 1}
        assert inventory.stock_of(101) == 9


def test_orders_wait_out_a_postgres_outage_instead_of_being_dead_lettered(
    private: PrivateDatabase, stack_settings: Settings
) -> None:
    """A whole worker (Kafka of the shared stack, isolated topics; the private FerretDB) with
    PostgreSQL stopped for longer than the retries-then-dead-letter path takes (~5 s): every
    order waits, and is applied once PostgreSQL is back."""
    settings = isolated(stack_settings).model_copy(
        update={
            "mongodb_uri": SecretStr(private.url),
            "mongodb_socket_timeout_ms": DEADLINE_MS,
        }
    )
    decisions: list[Decision] = []
    try:
        with open_pipeline(settings) as pipeline:
            pipeline.inventory.seed({101: 100})
            worker = Worker(settings, pipeline, listener=decisions.append)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            try:
                assert worker.wait_assigned(60)
                private.postgres.stop()
                with OrderProducer(settings) as producer:
                    for order_id in range(1, 11):
                        producer.send(Order(order_id=order_id, product_id=101, quantity=1))
                    assert producer.flush().delivered == 10
                time.sleep(12)
                assert decisions == []  # nothing decided while the database is away
                assert worker.loops["applier"].handler.breaker.state.value == "open"
                private.start_postgres()
                deadline = time.monotonic() + 60
                while len(decisions) < 10 and time.monotonic() < deadline:
                    time.sleep(0.2)
            finally:
                worker.stop()
                thread.join(30)
            assert [d.outcome for d in decisions] == [Outcome.APPLIED] * 10
            assert pipeline.inventory.stock_of(101) == 90
            assert worker.stats.outcomes["dead_lettered"] == 0
        assert read_topic(settings, settings.dlq_topic, timeout=5) == []
    finally:
        delete_topics(
            settings,
            [settings.topic, settings.commands_topic, settings.dlq_topic, settings.outcomes_topic],
        )
