"""The consume loop on the real Kafka: bounded runs, outputs that cannot be produced."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.consumer import Handled, LoopStats, Output, TransactionalLoop
from stockflow.deadletters import dead_letter_source, header_map
from stockflow.orders import Order
from stockflow.outcomes import Source, source_of
from stockflow.pipeline import Pipeline
from stockflow.producer import OrderProducer
from stockflow.retry import CircuitBreaker
from stockflow.topics import create_topic, delete_topics
from stockflow.worker import Worker, WorkerStats
from tests.integration.conftest import process, read_topic


def test_a_bounded_worker_run_commits_that_many_orders_and_applies_them(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    with OrderProducer(settings) as producer:
        for i in range(7):
            producer.send(Order(i, 101, 1))
    result: list[WorkerStats] = []
    worker = Worker(settings, pipeline)
    thread = threading.Thread(target=lambda: result.append(worker.run(max_messages=5)))
    thread.start()
    thread.join(90)
    if thread.is_alive():
        worker.stop()
        thread.join(30)
    [stats] = result
    assert (stats.router.messages, stats.applier.messages) == (5, 5)
    assert pipeline.inventory.stock_of(101) == 95


class Inflating:
    """Echoes each input to ``out``; the input ``big`` becomes an output of ``size`` bytes."""

    name = "inflating"

    def __init__(self, out: str, size: int) -> None:
        self.out = out
        self.size = size
        self.breaker = CircuitBreaker("inflating")

    def handle(self, messages: Sequence[Any]) -> Handled:
        return Handled(
            [
                Output(
                    self.out,
                    b"z" * self.size if m.value() == b"big" else m.value(),
                    source=source_of(m),
                )
                for m in messages
            ]
        )

    def dead_letter(self, message: Any, reason: str, attempts: int) -> Output:
        raise AssertionError(f"not expected: {reason}")


@pytest.mark.parametrize(
    ("refused_by", "size", "topic_limit"),
    [("the producer", 1_500_000, None), ("the broker", 300_000, 100_000)],
)
def test_an_output_that_cannot_be_produced_is_dead_lettered_and_its_neighbours_pass(
    settings: Settings, refused_by: str, size: int, topic_limit: int | None
) -> None:
    out = f"{settings.topic}.out"
    config = {"max.message.bytes": str(topic_limit)} if topic_limit else {}
    admin = AdminClient(settings.kafka_config())
    futures = admin.create_topics(
        [NewTopic(out, num_partitions=1, replication_factor=1, config=config)]
    )
    futures[out].result(30)
    create_topic(settings, settings.dlq_topic)
    try:
        with OrderProducer(settings) as producer:
            for value in (b"a", b"big", b"c", b"d"):
                producer.send_raw(value)
        loop = TransactionalLoop(
            settings, Inflating(out, size), topics=[settings.topic], group_id=settings.group_id
        )
        result: list[LoopStats] = []
        thread = threading.Thread(target=lambda: result.append(loop.run(max_messages=4)))
        began = time.monotonic()
        thread.start()
        thread.join(30)
        took = time.monotonic() - began
        if thread.is_alive():
            loop.stop()
            thread.join(30)
        assert result and result[0].messages == 4, f"stalled: {loop.stats}"
        assert took < 15, f"{took:.1f}s"
        assert [m.value() for m in read_topic(settings, out)] == [b"a", b"c", b"d"]  # type: ignore[attr-defined]
        [letter] = read_topic(settings, settings.dlq_topic)
        headers = header_map(letter.headers())  # type: ignore[attr-defined]
        assert letter.value() in (None, b"")  # type: ignore[attr-defined]
        assert dead_letter_source(letter.headers()) == Source(settings.topic, 0, 1)  # type: ignore[attr-defined]
        assert "too large or rejected" in headers["stockflow.dlq.reason"]
        assert headers["stockflow.dlq.original.size"] == str(size)
        digest = hashlib.sha256(b"z" * size).hexdigest()
        assert headers["stockflow.dlq.original.sha256"] == digest
    finally:
        delete_topics(settings, [out])


def test_a_message_near_kafkas_limit_is_dead_lettered_and_the_orders_behind_it_applied(
    settings: Settings, pipeline: Pipeline
) -> None:
    """Issue 10, case 2: an invalid 1,000,000-byte message, whose dead letter (the original
    bytes plus the reason headers) no longer fits the producer's limit."""
    pipeline.inventory.seed({101: 100})
    huge = b'{"orderId": 1, "pad": "' + b"x" * (1_000_000 - 26) + b'"}'
    assert len(huge) == 1_000_000 - 1
    with OrderProducer(settings, **{"message.max.bytes": 1_100_000}) as producer:
        producer.send(Order("before", 101, 1))
        producer.send_raw(huge)
        for i in range(3):
            producer.send(Order(f"after-{i}", 101, 1))
    began = time.monotonic()
    run = process(settings, pipeline, 5, timeout=30)
    took = time.monotonic() - began
    assert run.outcomes == {"applied": 4, "dead_lettered": 1}, run.outcomes
    assert took < 15, f"{took:.1f}s"
    report = run_audit(settings, pipeline)
    assert report.ok, report
    [letter] = read_topic(settings, settings.dlq_topic)
    headers = header_map(letter.headers())  # type: ignore[attr-defined]
    assert headers["stockflow.dlq.original.sha256"] == hashlib.sha256(huge).hexdigest()
