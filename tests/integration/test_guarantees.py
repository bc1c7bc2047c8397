"""The correctness guarantees on the real services: bad input, duplicates, replays, overselling."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pymongo import MongoClient

from stockflow.applier import Applier
from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.deadletters import DeadLetterStore
from stockflow.dlq import read_dead_letters, replay
from stockflow.errors import ConcurrentWriteError
from stockflow.ledger import Ledger
from stockflow.orders import Order, Restock
from stockflow.outcomes import Outcome, Source
from stockflow.pipeline import Pipeline, open_pipeline
from stockflow.planner import Decision, Entry, Owner, plan_batch
from stockflow.producer import OrderProducer
from stockflow.worker import Worker
from tests.integration.conftest import cleanup, isolated, outcome_events, process

BAD_MESSAGES = [
    b"not json",
    b"",
    b"\xff\xfe\x00 not utf-8",
    b'{"orderId": 1, "productId": "101", "quantity": 1}',
    b'{"orderId": 2, "productId": 101}',
    b'{"orderId": 3, "productId": 101, "quantity": -4}',
    b'{"orderId": 4, "productId": 101, "quantity": 99999999}',
    b'{"orderId": 5, "productId": {"$gt": 0}, "quantity": 1}',
    b'{"orderId": {"$ne": null}, "productId": 101, "quantity": 1}',
    b'{"orderId": 6, "productId": 101, "quantity": {"$inc": 100}}',
    b'{"orderId": 7, "productId": 101, "quantity": 1.5}',
    b"[1, 2, 3]",
    b'{"orderId": 8, "restockId": 8, "productId": 101, "quantity": 1}',
    b'{"orderId": 9, "productId": 101, "quantity": 1, "pad": "' + b"x" * 70_000 + b'"}',
    b'{"orderId": 10, "productId": 101, "quantity": 1, "pad": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b'{"orderId": "a\\u0000b", "productId": 101, "quantity": 1}',
]


def ledger_of(settings: Settings, pipeline: Pipeline) -> Ledger:
    return Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )


def test_bad_messages_are_dead_lettered_and_valid_ones_around_them_applied(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    with OrderProducer(settings, **{"message.max.bytes": 200_000}) as producer:
        for number, bad in enumerate(BAD_MESSAGES):
            producer.send_raw(bad, headers={"trace": f"t{number}".encode()})
            producer.send(Order(order_id=f"ok-{number}", product_id=101, quantity=1))
    run = process(settings, pipeline, 2 * len(BAD_MESSAGES))
    assert run.outcomes == {"applied": len(BAD_MESSAGES), "dead_lettered": len(BAD_MESSAGES)}
    assert pipeline.inventory.stock_of(101) == 100 - len(BAD_MESSAGES)

    letters = read_dead_letters(settings)
    assert [letter.value or b"" for letter in letters] == BAD_MESSAGES  # original bytes, in order
    for letter in letters:
        assert letter.reason and letter.source is not None and letter.time is not None
        assert letter.source.topic == settings.topic
    assert "invalid order" in letters[3].reason and "productId" in letters[3].reason
    assert "UTF-8" in letters[2].reason and "exceeds" in letters[13].reason
    assert "nested deeper" in letters[14].reason and "control character" in letters[15].reason
    assert all(letter.attempts == 1 for letter in letters)  # refused at once, never retried
    assert run_audit(settings, pipeline).ok


def test_a_fixed_dead_letter_can_be_replayed(settings: Settings, pipeline: Pipeline) -> None:
    pipeline.inventory.seed({101: 10})
    with OrderProducer(settings) as producer:
        producer.send_raw(b'{"orderId": 1, "productId": "101", "quantity": 2}')
    process(settings, pipeline, 1)
    [letter] = read_dead_letters(settings)
    store = DeadLetterStore(pipeline.mongo[settings.database])
    replay(settings, [letter], store, value=b'{"orderId": 1, "productId": 101, "quantity": 2}')
    assert process(settings, pipeline, 1).outcomes == {"applied": 1}
    assert pipeline.inventory.stock_of(101) == 8
    assert run_audit(settings, pipeline).ok


def test_an_order_sent_twice_is_applied_once_and_the_copy_says_so(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10, 102: 10})
    order = Order(order_id="same", product_id=101, quantity=3)
    with OrderProducer(settings) as producer:
        producer.send(order)
        producer.send(order)
        producer.send(Order(order_id="same", product_id=102, quantity=1))  # same id, other product
    run = process(settings, pipeline, 3)
    assert run.outcomes == {"applied": 1, "duplicate": 2}
    # The copies are on different partitions: whichever claimed the id first is the order.
    stocks = (pipeline.inventory.stock_of(101), pipeline.inventory.stock_of(102))
    assert stocks in {(7, 10), (10, 9)}
    record = ledger_of(settings, pipeline).find("order", "same")
    assert record is not None and len(record["duplicates"]) == 2
    statuses = sorted(e.status.value for e in outcome_events(settings))
    assert statuses == ["applied", "duplicate", "duplicate"]
    assert run_audit(settings, pipeline).ok


def test_a_replayed_batch_is_not_applied_twice(settings: Settings, pipeline: Pipeline) -> None:
    """Crash after the MongoDB writes, before the Kafka commit: the batch comes again."""
    pipeline.inventory.seed({101: 10, 102: 5})
    ledger = ledger_of(settings, pipeline)
    applier = Applier(settings, pipeline.inventory, ledger, pipeline.cache)
    entries = [
        Entry(Source("cmds", 0, 10 + i), Source(settings.topic, 0, i), command)
        for i, command in enumerate(
            [
                Order(order_id=1, product_id=101, quantity=4),
                Restock(restock_id="r", product_id=102, quantity=5),
                Order(order_id=2, product_id=101, quantity=4),
                Order(order_id=3, product_id=101, quantity=4),
            ]
        )
    ]
    first = applier._apply(entries)
    again = applier._apply(entries)
    assert [(d.outcome, d.stock_after) for d in again] == [
        (d.outcome, d.stock_after) for d in first
    ]
    assert [d.outcome for d in first] == [
        Outcome.APPLIED, Outcome.APPLIED, Outcome.APPLIED, Outcome.INSUFFICIENT_STOCK,
    ]  # fmt: skip
    assert (pipeline.inventory.stock_of(101), pipeline.inventory.stock_of(102)) == (2, 10)

    # Crash between the product write and finishing the records: the redo finishes them.
    more = [Entry(Source("cmds", 0, 20), Source(settings.topic, 0, 9), Order(9, 101, 1))]
    owners = ledger.claim(more)
    plan = plan_batch(more, pipeline.inventory.load([101]), owners)
    pipeline.inventory.write_changes(plan.changes)
    [redo] = applier._apply(more)
    assert (redo.outcome, redo.stock_after) == (Outcome.APPLIED, 1)
    assert pipeline.inventory.stock_of(101) == 1
    assert (ledger.find("order", 9) or {}).get("status") == "applied"


def test_remembered_products_never_outvote_mongodb(settings: Settings, pipeline: Pipeline) -> None:
    """The applier plans from memory; a product changed behind its back is re-read, both when
    the plan writes it (the compare-and-set fails) and when it does not (it is read back)."""
    pipeline.inventory.seed({101: 10})
    applier = Applier(settings, pipeline.inventory, ledger_of(settings, pipeline), pipeline.cache)

    def order(offset: int, quantity: int) -> Entry:
        return Entry(
            Source("cmds", 0, offset),
            Source(settings.topic, 0, offset),
            Order(order_id=f"m{offset}", product_id=101, quantity=quantity),
        )

    [first] = applier._apply([order(1, 4)])
    assert (first.outcome, first.stock_after) == (Outcome.APPLIED, 6)  # memory now says 6

    pipeline.inventory.seed({101: 2})  # someone resets the stock directly
    [second] = applier._apply([order(2, 5)])  # from memory: apply; from MongoDB: too few
    assert (second.outcome, second.stock_after) == (Outcome.INSUFFICIENT_STOCK, 2)

    pipeline.inventory.seed({101: 50})  # memory says 2 (a rejection writes nothing)
    [third] = applier._apply([order(3, 5)])
    assert (third.outcome, third.stock_after) == (Outcome.APPLIED, 45)
    assert pipeline.inventory.stock_of(101) == 45


def test_a_second_writer_is_detected_not_overwritten(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10})
    entries = [Entry(Source("cmds", 0, 1), Source("in", 0, 1), Order(1, 101, 2))]
    plan = plan_batch(
        entries, pipeline.inventory.load([101]), {("order", 1): Owner(entries[0].position)}
    )
    pipeline.inventory.products.update_one({"product_id": 101}, {"$inc": {"stock": -1}})
    with pytest.raises(ConcurrentWriteError):
        pipeline.inventory.write_changes(plan.changes)
    assert pipeline.inventory.stock_of(101) == 9


def _naive_sell(url: str, database: str, sold: list[int], attempts: int) -> None:
    client: MongoClient[dict[str, object]] = MongoClient(url)
    products = client[database].products
    for _ in range(attempts):
        doc = products.find_one({"product_id": 101})
        if doc is not None and int(doc["stock"]) >= 1:  # type: ignore[call-overload]
            result = products.update_one(
                {"product_id": 101, "stock": {"$gte": 1}}, {"$inc": {"stock": -1}}
            )
            sold.append(result.modified_count)
    client.close()


def test_naive_guarded_decrement_is_atomic_and_stockflow_never_oversells(
    stack_settings: Settings,
) -> None:
    """Two naive writers' ``{stock >= 1}`` + ``$inc`` never oversell, nor do two stockflow workers.

    The guarded update is atomic on MongoDB and on the local stack's FerretDB build (its
    compare-and-set patch); an unpatched FerretDB v1 oversold here (FerretDB #3040).
    """
    naive = isolated(stack_settings)
    try:
        with open_pipeline(naive) as pipeline:
            pipeline.inventory.seed({101: 100})
            sold: list[int] = []
            threads = [
                threading.Thread(
                    target=_naive_sell, args=(naive.mongodb_url, naive.database, sold, 150)
                )
                for _ in range(2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            final = pipeline.inventory.stock_of(101)
            oversold = sum(sold) - (100 - (final or 0))
            assert (sum(sold), final, oversold) == (100, 0, 0)
    finally:
        cleanup(naive)

    s = isolated(stack_settings, partitions=3)
    try:
        with open_pipeline(s) as pipeline:
            pipeline.inventory.seed({101: 100})
            with OrderProducer(s) as producer:  # no key: spread over the three partitions
                for i in range(300):
                    producer.send_raw(Order(i, 101, 1).encode())
            decided: list[Decision] = []
            workers = [Worker(s, pipeline, listener=decided.append) for _ in range(2)]
            threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 90
            while len(decided) < 300 and deadline > time.monotonic():
                time.sleep(0.1)
            for w in workers:
                w.stop()
            for t in threads:
                t.join(30)
            assert len(decided) == 300
            assert pipeline.inventory.stock_of(101) == 0
            report = run_audit(s, pipeline)
            assert report.outcomes["applied"] == 100
            assert report.outcomes["insufficient_stock"] == 200
            assert report.ok, report
    finally:
        cleanup(s)


@pytest.fixture(scope="module")
def fuzz_settings(stack_settings: Settings) -> Iterator[Settings]:
    s = isolated(stack_settings)
    yield s
    cleanup(s)


@hsettings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    junk=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.dictionaries(
                st.sampled_from(["orderId", "productId", "quantity", "restockId", "$set"]),
                st.one_of(
                    st.integers(), st.text(max_size=5), st.none(), st.floats(), st.booleans()
                ),
            ).map(lambda d: __import__("json").dumps(d).encode()),
        ),
        min_size=5,
        max_size=30,
    )
)
def test_generated_junk_never_stops_the_line(fuzz_settings: Settings, junk: list[bytes]) -> None:
    s = fuzz_settings
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({101: 10_000})
        before = pipeline.inventory.stock_of(101) or 0
        with OrderProducer(s) as producer:
            for payload in junk:
                producer.send_raw(payload)
                producer.send(Order(f"valid-{uuid.uuid4().hex}", 101, 1))
        run = process(s, pipeline, 2 * len(junk))
        valid = run.outcomes.get("applied", 0)
        assert valid >= len(junk)  # every valid order next to the junk was applied
        assert pipeline.inventory.stock_of(101) == before - valid
        assert sum(run.outcomes.values()) == 2 * len(junk)


def test_worker_health_reports_each_stage(settings: Settings, pipeline: Pipeline) -> None:
    pipeline.inventory.seed({101: 5})
    with OrderProducer(settings) as producer:
        producer.send(Order(1, 101, 1))
    worker = Worker(settings, pipeline)
    thread = threading.Thread(target=lambda: worker.run(idle_timeout=4), daemon=True)
    thread.start()
    thread.join(60)
    health = worker.health()
    assert set(health) == {"router", "applier"}
    assert health["applier"]["circuit"] == "closed" and health["applier"]["messages"] == 1
    assert health["router"]["messages"] == 1
