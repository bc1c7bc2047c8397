"""Revoked means revoked: a rebalance in the middle of a batch on the real Kafka.

A worker's router fills its batch while the applier beside it is busy (the hold); a second
worker joining meanwhile takes some input partitions, and reads them from their committed
offsets. The first worker must drop the messages of those partitions from the batch in hand,
so that no order is routed (committed) by both members.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import pytest
from confluent_kafka import ConsumerGroupState

from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.consumer import Handled
from stockflow.orders import Order
from stockflow.pipeline import open_pipeline
from stockflow.planner import Decision
from stockflow.producer import OrderProducer
from stockflow.topics import admin_client
from stockflow.worker import Worker
from tests.integration.conftest import cleanup, isolated, read_topic


class Slow:
    """The applier, busy with each batch until ``release`` is set (at most 30 s), and then
    ``each`` seconds per batch."""

    def __init__(self, inner: Any, each: float = 0.0) -> None:
        self.inner = inner
        self.each = each
        self.release = threading.Event()

    def handle(self, messages: Sequence[Any]) -> Handled:
        self.release.wait(30)
        time.sleep(self.each)
        result: Handled = self.inner.handle(messages)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def three_partitions(stack_settings: Settings) -> Iterator[Settings]:
    s = isolated(stack_settings, partitions=3).model_copy(update={"router_hold_ms": 20_000})
    yield s
    cleanup(s)


def _rebalancing(settings: Settings, group: str, *, timeout: float) -> bool:
    """Wait until ``group`` is preparing a rebalance (a member asked to join)."""
    admin = admin_client(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        [future] = admin.describe_consumer_groups([group]).values()
        if future.result().state == ConsumerGroupState.PREPARING_REBALANCING:
            return True
        time.sleep(0.2)
    return False


def _send(settings: Settings, first: int, count: int) -> None:
    with OrderProducer(settings) as producer:  # no key: spread over the input partitions
        for i in range(first, first + count):
            producer.send_raw(Order(f"o{i}", 101 + i % 3, 1).encode())


def test_no_order_is_routed_by_two_members_when_a_worker_joins_mid_batch(
    three_partitions: Settings,
) -> None:
    s = three_partitions
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({101: 1000, 102: 1000, 103: 1000})
        decided: list[Decision] = []
        lock = threading.Lock()

        def listen(decision: Decision) -> None:
            with lock:
                decided.append(decision)

        first = Worker(s, pipeline, listener=listen)
        slow = Slow(first.loops["applier"].handler)
        first.loops["applier"].handler = slow  # type: ignore[assignment]
        threads = [threading.Thread(target=first.run, daemon=True)]
        threads[0].start()
        assert first.wait_assigned(30)
        _send(s, 0, 3)  # the applier takes these and stays busy ...
        deadline = time.monotonic() + 20
        while not first.loops["applier"].busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.loops["applier"].busy
        _send(s, 3, 60)  # ... while the router holds these in its batch
        time.sleep(1.5)
        second = Worker(s, pipeline, listener=listen)  # joins: the router group rebalances
        threads.append(threading.Thread(target=second.run, daemon=True))
        threads[1].start()
        # Its router gets partitions once the first router gave them up (in its hold); its
        # applier waits for the first applier, busy until released.
        assert second.loops["router"].assigned.wait(30)
        time.sleep(2)
        slow.release.set()
        deadline = time.monotonic() + 60
        while len(decided) < 63 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # a second copy, if any, would come now
        for worker in (first, second):
            worker.stop()
        for thread in threads:
            thread.join(30)

        routed = Counter(
            dict(m.headers() or []).get("stockflow.source")  # type: ignore[attr-defined]
            for m in read_topic(s, s.commands_topic)
        )
        twice = {source: n for source, n in routed.items() if n > 1}
        assert twice == {}, f"routed by both members: {twice}"
        assert len(routed) == 63
        report = run_audit(s, pipeline)
        assert report.ok, report
        assert report.outcomes["applied"] == 63 and len(decided) == 63
        dropped = first.loops["router"].stats.dropped
        assert dropped > 0, "the rebalance did not fall in the middle of the router's batch"


def test_no_command_is_applied_by_two_members_when_an_applier_joins_mid_batch(
    three_partitions: Settings,
) -> None:
    """The applier stage: a second applier joins while the first holds a long batch of the
    commands topic. Every command gets exactly one outcome event, the two members' committed
    decisions are disjoint, and the audit is clean."""
    s = three_partitions.model_copy(update={"batch_size": 20})
    total = 300
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({pid: 1000 for pid in range(101, 107)})
        with OrderProducer(s) as producer:
            for i in range(total):
                producer.send_raw(Order(f"c{i}", 101 + i % 6, 1).encode())
        router = Worker(s, pipeline, roles=("router",))
        assert router.run(max_messages=total).router.messages == total

        decided: dict[str, list[Decision]] = {"first": [], "second": []}
        lock = threading.Lock()

        def listener(name: str) -> Any:
            def listen(decision: Decision) -> None:
                with lock:
                    decided[name].append(decision)

            return listen

        first = Worker(s, pipeline, listener=listener("first"), roles=("applier",))
        # Slow enough after its first batch that the rebalance (noticed at the next heartbeat,
        # 3 s) comes before it has applied everything.
        slow = Slow(first.loops["applier"].handler, each=0.3)
        first.loops["applier"].handler = slow  # type: ignore[assignment]
        threads = [threading.Thread(target=first.run, daemon=True)]
        threads[0].start()
        deadline = time.monotonic() + 30
        while not first.loops["applier"].busy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.loops["applier"].busy  # holding its first batch of commands
        second = Worker(s, pipeline, listener=listener("second"), roles=("applier",))
        threads.append(threading.Thread(target=second.run, daemon=True))
        threads[1].start()
        # Release the first applier's batch only once the group is rebalancing (the second
        # member asked to join): the rebalance falls in the middle of that batch.
        assert _rebalancing(s, s.group_id, timeout=60), "the second applier never joined"
        slow.release.set()
        deadline = time.monotonic() + 90
        while sum(map(len, decided.values())) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # a second copy, if any, would come now
        for worker in (first, second):
            worker.stop()
        for thread in threads:
            thread.join(30)

        events = [msgspec.json.decode(m.value()) for m in read_topic(s, s.outcomes_topic)]  # type: ignore[attr-defined]
        per_source = Counter(tuple(e["source"]) for e in events)  # [topic, partition, offset]
        twice = {source: n for source, n in per_source.items() if n > 1}
        assert twice == {}, f"outcome events twice: {twice}"
        assert len(per_source) == total
        sources = {name: {d.entry.source for d in ds} for name, ds in decided.items()}
        assert sources["first"].isdisjoint(sources["second"])
        assert len(sources["first"] | sources["second"]) == total
        assert sources["second"], "the second applier handled nothing: no rebalance mid-way"
        report = run_audit(s, pipeline)
        assert report.ok, report
        assert report.outcomes["applied"] == total
