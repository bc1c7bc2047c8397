"""Markers that know their topic: a product's marker is never taken for another topic's replay.

Each product's ``_stockflow`` marker says which commands of which commands topic were written
but maybe not committed. These tests run the pipelines a user would: two pipelines with their
own ``--topic`` on one database, a commands topic deleted and recreated, a second run after
every topic was deleted (``make clean`` with the database kept), both pipelines at once on the
same products, and a replay of one pipeline's batch after the other wrote the product.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from stockflow.applier import Applier
from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.errors import ConcurrentWriteError
from stockflow.ledger import Ledger
from stockflow.orders import Command, Order, Restock
from stockflow.outcomes import Outcome, Source
from stockflow.pipeline import Pipeline, open_pipeline
from stockflow.planner import MARKER, Entry, Owner, plan_batch
from stockflow.producer import OrderProducer
from stockflow.topics import create_topic, delete_topics, topic_id
from stockflow.worker import Worker
from tests.integration.conftest import cleanup, isolated, process

P = 101


def send(settings: Settings, commands: list[Command]) -> None:
    with OrderProducer(settings) as producer:
        for command in commands:
            producer.send(command)


def orders(prefix: str, count: int, quantity: int) -> list[Command]:
    return [Order(order_id=f"{prefix}-{i}", product_id=P, quantity=quantity) for i in range(count)]


def sharing(stack_settings: Settings, settings: Settings) -> Settings:
    """A second pipeline (own topics and groups) on the same database and cache."""
    other = isolated(stack_settings)
    return other.model_copy(
        update={"database": settings.database, "cache_key_prefix": settings.cache_key_prefix}
    )


@pytest.fixture
def second(stack_settings: Settings, settings: Settings) -> Iterator[Settings]:
    other = sharing(stack_settings, settings)
    yield other
    cleanup(other)


def wait_deleted(settings: Settings, names: list[str], timeout: float = 60) -> None:
    """Delete these topics and wait until Kafka lets them be created again."""
    delete_topics(settings, names)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            try:
                topic_id(settings, name)
            except Exception:
                break  # gone
            assert time.monotonic() < deadline, f"topic {name} still there after {timeout}s"
            time.sleep(0.2)


def recreate(settings: Settings, name: str, partitions: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            create_topic(settings, name, partitions=partitions)
            return
        except Exception:  # still marked for deletion
            assert time.monotonic() < deadline, f"cannot recreate {name}"
            time.sleep(0.5)


def assert_audits_clean(*pipelines: tuple[Settings, Pipeline]) -> None:
    for s, p in pipelines:
        report = run_audit(s, p)
        assert report.ok, (s.topic, report)


def test_two_pipelines_on_one_database_each_decrement_the_shared_product(
    stack_settings: Settings, settings: Settings, pipeline: Pipeline, second: Settings
) -> None:
    pipeline.inventory.seed({P: 100})
    send(settings, orders("a", 5, 1))
    assert process(settings, pipeline, 5).outcomes == {"applied": 5}
    assert pipeline.inventory.stock_of(P) == 95

    send(second, orders("b", 3, 2))  # commands at offsets 0..2 of another commands topic
    with open_pipeline(second) as other:
        assert process(second, other, 3).outcomes == {"applied": 3}
        assert other.inventory.stock_of(P) == 89  # before markers knew their topic: 95
        assert_audits_clean((settings, pipeline), (second, other))
    # The first pipeline carries on from its own marker.
    send(settings, orders("a2", 2, 1))
    assert process(settings, pipeline, 2).outcomes == {"applied": 2}
    assert pipeline.inventory.stock_of(P) == 87
    assert_audits_clean((settings, pipeline))


def test_a_recreated_commands_topic_is_another_topic(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({P: 100})
    send(settings, orders("a", 5, 1))
    assert process(settings, pipeline, 5).outcomes == {"applied": 5}
    before = topic_id(settings, settings.commands_topic)

    wait_deleted(settings, [settings.commands_topic])
    recreate(settings, settings.commands_topic, settings.commands_partitions)
    assert topic_id(settings, settings.commands_topic) != before

    send(settings, orders("b", 3, 2))  # the same commands-topic offsets 0..2 as before
    assert process(settings, pipeline, 3).outcomes == {"applied": 3}
    assert pipeline.inventory.stock_of(P) == 89
    assert_audits_clean((settings, pipeline))


def test_ids_applied_before_a_topic_was_recreated_are_duplicates_when_sent_again(
    settings: Settings, pipeline: Pipeline
) -> None:
    """The same order ids sent again to a recreated commands topic land at the same topic
    name, partition and offsets as their first copies: they are duplicates, not the owners
    coming back (before claims knew their topic: applied twice, stock 90, audit clean)."""
    pipeline.inventory.seed({P: 100})
    send(settings, orders("a", 5, 1))
    assert process(settings, pipeline, 5).outcomes == {"applied": 5}

    wait_deleted(settings, [settings.commands_topic])
    recreate(settings, settings.commands_topic, settings.commands_partitions)

    send(settings, orders("a", 5, 1))  # commands-topic offsets 0..4 again
    assert process(settings, pipeline, 5).outcomes == {"duplicate": 5}
    assert pipeline.inventory.stock_of(P) == 95
    ledger = Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )
    record = ledger.find("order", "a-0") or {}
    assert (record.get("status"), len(record.get("duplicates") or [])) == ("applied", 1)
    assert_audits_clean((settings, pipeline))


def test_ids_sent_again_after_every_topic_was_deleted_are_duplicates(
    settings: Settings, pipeline: Pipeline
) -> None:
    """``make clean`` with the database kept, then the same orders again: every position
    (input and commands) repeats, and still each id is applied once."""
    pipeline.inventory.seed({P: 100})
    send(settings, orders("a", 5, 1))
    assert process(settings, pipeline, 5).outcomes == {"applied": 5}

    names = [settings.topic, settings.commands_topic, settings.dlq_topic, settings.outcomes_topic]
    wait_deleted(settings, names)
    recreate(settings, settings.topic, 1)

    send(settings, orders("a", 5, 1))
    assert process(settings, pipeline, 5).outcomes == {"duplicate": 5}
    assert pipeline.inventory.stock_of(P) == 95
    report = run_audit(settings, pipeline, messages=False)
    assert not report.stock_mismatches and not report.negative_stock, report


def test_a_second_run_after_every_topic_was_deleted(settings: Settings, pipeline: Pipeline) -> None:
    """``make clean`` wipes Kafka; the database survives."""
    pipeline.inventory.seed({P: 100})
    send(settings, orders("a", 5, 1))
    assert process(settings, pipeline, 5).outcomes == {"applied": 5}

    names = [settings.topic, settings.commands_topic, settings.dlq_topic, settings.outcomes_topic]
    wait_deleted(settings, names)
    recreate(settings, settings.topic, 1)

    send(settings, orders("b", 3, 2))
    assert process(settings, pipeline, 3).outcomes == {"applied": 3}
    assert pipeline.inventory.stock_of(P) == 89
    # The input topic's positions repeat too: the audit tells its incarnations apart.
    assert_audits_clean((settings, pipeline))


def test_the_audit_tells_a_recreated_input_topic_from_its_predecessor(
    settings: Settings, pipeline: Pipeline
) -> None:
    """The input topic alone deleted and recreated, the same run sent again: each new message
    (a duplicate of its predecessor's id, or a dead letter) has one outcome at a position that
    the old topic's message also had. Before the audit knew incarnations: 3 several outcomes."""
    pipeline.inventory.seed({P: 100})

    def run() -> None:
        send(settings, orders("a", 2, 1))
        with OrderProducer(settings) as producer:
            producer.send_raw(b"not an order")
        process(settings, pipeline, 3)

    run()
    wait_deleted(settings, [settings.topic])
    recreate(settings, settings.topic, 1)
    run()
    report = run_audit(settings, pipeline)
    assert report.messages_checked == 3
    assert report.ok, report
    assert pipeline.inventory.stock_of(P) == 98


def test_two_pipelines_writing_the_same_products_at_once_lose_no_update(
    settings: Settings, pipeline: Pipeline, second: Settings
) -> None:
    """Two writers of three products: small batches, so that their writes collide often.
    Needs a real compare-and-set (MongoDB, or the local stack's patched FerretDB)."""
    settings = settings.model_copy(update={"batch_size": 20})
    second = second.model_copy(update={"batch_size": 20})
    products = {P: 300, 102: 300, 103: 300}
    pipeline.inventory.seed(products)
    per_pipeline = 600
    for s, prefix in ((settings, "a"), (second, "b")):
        send(
            s,
            [
                Restock(restock_id=f"{prefix}-r{i}", product_id=101 + i % 3, quantity=2)
                if i % 5 == 0
                else Order(order_id=f"{prefix}-{i}", product_id=101 + i % 3, quantity=1)
                for i in range(per_pipeline)
            ],
        )
    with open_pipeline(second) as other:
        runs: dict[str, object] = {}

        def run(name: str, s: Settings, p: Pipeline) -> None:
            runs[name] = process(s, p, per_pipeline, timeout=120)

        threads = [
            threading.Thread(target=run, args=("a", settings, pipeline)),
            threading.Thread(target=run, args=("b", second, other)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert set(runs) == {"a", "b"}
        net = {pid: 0 for pid in products}
        for name in ("a", "b"):
            for decision in runs[name].decisions:  # type: ignore[attr-defined]
                if decision.outcome is Outcome.APPLIED:
                    command = decision.entry.command
                    net[command.product_id] += command.delta
        for pid, stock in products.items():
            assert pipeline.inventory.stock_of(pid) == stock + net[pid]
        assert_audits_clean((settings, pipeline), (second, other))


def entries(topic: str, tid: str, start: int, commands: list[Command]) -> list[Entry]:
    return [
        Entry(Source(topic, 0, start + i), Source(f"in-{topic}", 0, start + i), c, topic_id=tid)
        for i, c in enumerate(commands)
    ]


def appliers(settings: Settings, pipeline: Pipeline) -> Callable[[], Applier]:
    """Makes a fresh applier (nothing remembered), as the next owner after a crash would be."""
    database = pipeline.mongo[settings.database]

    def applier() -> Applier:
        ledger = Ledger(database, settings.orders_collection, settings.restocks_collection)
        return Applier(settings, pipeline.inventory, ledger, pipeline.cache)

    return applier


def test_a_replay_after_the_other_pipeline_wrote_the_product_is_not_applied_twice(
    settings: Settings, pipeline: Pipeline
) -> None:
    """A writes P and crashes before its Kafka commit, B writes P, A's batch comes again."""
    pipeline.inventory.seed({P: 20})
    applier = appliers(settings, pipeline)
    a_batch = entries("a.cmds", "id-a", 10, [*orders("a", 3, 4), Restock("a-r", P, 1)])
    b_batch = entries("b.cmds", "id-b", 0, [Order("b-0", P, 4), Order("b-1", P, 5)])
    first = applier()._apply(a_batch)  # written and recorded; the Kafka commit never happens
    assert pipeline.inventory.stock_of(P) == 9
    assert [d.outcome for d in applier()._apply(b_batch)] == [Outcome.APPLIED] * 2
    assert pipeline.inventory.stock_of(P) == 0

    # A's next owner replays the batch and carries on with new commands.
    more = entries("a.cmds", "id-a", 14, [Order("a-9", P, 1), Restock("a-r2", P, 3)])
    again = applier()._apply(a_batch + more)
    assert [(d.outcome, d.stock_after) for d in again[:4]] == [
        (d.outcome, d.stock_after) for d in first
    ]
    assert [(d.outcome, d.stock_after) for d in again[4:]] == [
        (Outcome.INSUFFICIENT_STOCK, 0),  # decided from the stored stock, which B emptied
        (Outcome.APPLIED, 3),
    ]
    assert pipeline.inventory.stock_of(P) == 3
    marker = pipeline.inventory.products.find_one({"product_id": P})[MARKER]  # type: ignore[index]
    assert sorted(entry["id"] for entry in marker["topics"]) == ["id-a", "id-b"]
    report = run_audit(settings, pipeline, messages=False)
    assert not report.stock_mismatches, report


def test_a_recorded_refusal_read_again_after_a_restock_stays_a_refusal(
    settings: Settings, pipeline: Pipeline
) -> None:
    """An order of 5 at stock 3 is refused and committed; a restock of 10 follows; offset 0 is
    read again (offsets reset or expired, or an ambiguous commit rewound). Before, it was
    decided again from the stock: a phantom ``applied`` (stock after 8, stock still 13) and
    its record rewritten to say so. The recorded decision is the decision."""
    pipeline.inventory.seed({P: 3})
    applier = appliers(settings, pipeline)
    refused = entries("a.cmds", "id-a", 0, [Order("a-0", P, 5)])
    [first] = applier()._apply(refused)
    assert (first.outcome, first.stock_after) == (Outcome.INSUFFICIENT_STOCK, 3)
    applier()._apply(entries("a.cmds", "id-a", 1, [Restock("a-r", P, 10)]))
    assert pipeline.inventory.stock_of(P) == 13

    [again] = applier()._apply(refused)
    assert (again.outcome, again.stock_after) == (Outcome.INSUFFICIENT_STOCK, 3)
    assert pipeline.inventory.stock_of(P) == 13
    ledger = Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )
    assert (ledger.find("order", "a-0") or {}).get("status") == "insufficient_stock"
    # Read again together with the restock (earlier batches than the marker's steps hold).
    assert [
        (d.outcome, d.stock_after)
        for d in applier()._apply(refused + entries("a.cmds", "id-a", 1, [Restock("a-r", P, 10)]))
    ] == [(Outcome.INSUFFICIENT_STOCK, 3), (Outcome.APPLIED, 13)]
    assert pipeline.inventory.stock_of(P) == 13
    report = run_audit(settings, pipeline, messages=False)
    assert not report.stock_mismatches, report


def test_a_refusal_crashed_before_its_record_is_decided_by_the_replay(
    settings: Settings, pipeline: Pipeline
) -> None:
    """A refuses an order (no write) and crashes before recording it; B restocks; A's replay
    decides from the new stock (nothing was published, so nothing contradicts it), writes,
    and its record says what it publishes."""
    pipeline.inventory.seed({P: 1})
    applier = appliers(settings, pipeline)
    applier()._apply(entries("b.cmds", "id-b", 0, [Order("b-0", P, 1)]))
    a_batch = entries("a.cmds", "id-a", 0, [Order("a-0", P, 2)])
    crashed = applier()
    plan = plan_batch(a_batch, pipeline.inventory.load([P]), crashed.ledger.claim(a_batch))
    assert [d.outcome for d in plan.decisions] == [Outcome.INSUFFICIENT_STOCK]
    assert plan.changes == []  # no write; the crash comes before the records
    applier()._apply(entries("b.cmds", "id-b", 1, [Restock("b-r", P, 5)]))
    [replayed] = applier()._apply(a_batch)
    assert (replayed.outcome, replayed.stock_after) == (Outcome.APPLIED, 3)
    assert pipeline.inventory.stock_of(P) == 3
    ledger = Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )
    assert (ledger.find("order", "a-0") or {}).get("status") == "applied"
    report = run_audit(settings, pipeline, messages=False)
    assert not report.stock_mismatches, report


def test_a_refusal_recorded_before_a_crash_is_published_as_recorded(
    settings: Settings, pipeline: Pipeline
) -> None:
    """A refuses an order (no write), records it and crashes before its commit; B restocks;
    A's replay publishes the recorded refusal: the record and the outcome agree."""
    pipeline.inventory.seed({P: 1})
    applier = appliers(settings, pipeline)
    applier()._apply(entries("b.cmds", "id-b", 0, [Order("b-0", P, 1)]))
    a_batch = entries("a.cmds", "id-a", 0, [Order("a-0", P, 2)])
    [refused] = applier()._apply(a_batch)  # recorded, never committed
    assert refused.outcome is Outcome.INSUFFICIENT_STOCK
    applier()._apply(entries("b.cmds", "id-b", 1, [Restock("b-r", P, 5)]))
    [replayed] = applier()._apply(a_batch)
    assert (replayed.outcome, replayed.stock_after) == (Outcome.INSUFFICIENT_STOCK, 0)
    assert pipeline.inventory.stock_of(P) == 5
    ledger = Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )
    assert (ledger.find("order", "a-0") or {}).get("status") == "insufficient_stock"
    report = run_audit(settings, pipeline, messages=False)
    assert not report.stock_mismatches, report


def test_the_compare_and_set_fences_a_pipeline_that_planned_from_an_older_version(
    settings: Settings, pipeline: Pipeline
) -> None:
    """B's write leaves the stock as it was (a restock and an order): A's plan from before it
    still fails its compare-and-set, on the marker's version, and A plans again."""
    pipeline.inventory.seed({P: 10})
    applier = appliers(settings, pipeline)
    applier()._apply(entries("a.cmds", "id-a", 0, [Order("a-0", P, 1)]))
    a_batch = entries("a.cmds", "id-a", 1, [Order("a-1", P, 9)])
    stale = plan_batch(
        a_batch, pipeline.inventory.load([P]), {("order", "a-1"): Owner(a_batch[0].position)}
    )
    applier()._apply(entries("b.cmds", "id-b", 0, [Restock("b-r", P, 4), Order("b-0", P, 4)]))
    assert pipeline.inventory.stock_of(P) == 9
    with pytest.raises(ConcurrentWriteError):
        pipeline.inventory.write_changes(stale.changes)
    [decided] = applier()._apply(a_batch)
    assert (decided.outcome, decided.stock_after) == (Outcome.APPLIED, 0)


def test_an_old_format_marker_is_taken_for_no_topic(settings: Settings, pipeline: Pipeline) -> None:
    """A marker written before markers named their topic: decide from the stored stock."""
    pipeline.inventory.seed({P: 100})
    old = {"partition": 0, "first": 0, "last": 40, "before": 104, "steps": {"40": 100}}
    pipeline.inventory.products.update_one(
        {"product_id": P}, {"$set": {MARKER: {**old, "baseline": 104, "since": 0}}}
    )
    send(settings, orders("a", 3, 2))
    worker_run = process(settings, pipeline, 3)
    assert worker_run.outcomes == {"applied": 3}
    assert pipeline.inventory.stock_of(P) == 94
    assert_audits_clean((settings, pipeline))


def test_the_applier_learns_the_commands_topic_id(settings: Settings, pipeline: Pipeline) -> None:
    pipeline.inventory.seed({P: 10})
    send(settings, orders("a", 1, 1))
    process(settings, pipeline, 1)
    doc = pipeline.inventory.products.find_one({"product_id": P})
    assert doc is not None
    [entry] = doc[MARKER]["topics"]
    assert entry["topic"] == settings.commands_topic
    assert entry["id"] == topic_id(settings, settings.commands_topic)
    [record] = pipeline.mongo[settings.database][settings.orders_collection].find({})
    assert record["topicId"] == entry["id"]


def test_a_running_worker_learns_the_id_of_its_recreated_commands_topic(
    settings: Settings, pipeline: Pipeline
) -> None:
    """The commands topic is deleted and recreated under a running worker: the applier's new
    assignment makes it look the topic's id up again."""
    pipeline.inventory.seed({P: 100})
    decisions: list[Outcome] = []
    worker = Worker(settings, pipeline, listener=lambda d: decisions.append(d.outcome))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:

        def wait_for(count: int, timeout: float = 120) -> None:
            deadline = time.monotonic() + timeout
            while len(decisions) < count and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(decisions) >= count, f"{len(decisions)} of {count} in {timeout}s"

        send(settings, orders("a", 5, 1))
        wait_for(5)
        wait_deleted(settings, [settings.commands_topic])
        recreate(settings, settings.commands_topic, settings.commands_partitions)
        send(settings, orders("b", 3, 2))
        wait_for(8)
    finally:
        worker.stop()
        thread.join(60)
    assert decisions == [Outcome.APPLIED] * 8
    assert pipeline.inventory.stock_of(P) == 89
    assert_audits_clean((settings, pipeline))


def test_a_dead_letter_of_a_recreated_topic_does_not_release_the_old_owners_claim(
    settings: Settings, pipeline: Pipeline
) -> None:
    """A copy at the same position of a recreated topic that is dead-lettered must not free
    the id its predecessor applied (its replay would apply the id a second time)."""
    pipeline.inventory.seed({P: 10})
    applier = appliers(settings, pipeline)
    [old] = entries("a.cmds", "id-old", 0, [Order("a-0", P, 1)])
    applier()._apply([old])
    ledger = Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )
    ledger.release([Entry(old.position, old.source, old.command, topic_id="id-new")])
    claim = ledger.claims["order"].find_one({"_id": "a-0"})
    assert claim is not None and claim["topicId"] == "id-old"
    ledger.release([old])  # the owner itself does release it
    assert ledger.claims["order"].find_one({"_id": "a-0"}) is None
