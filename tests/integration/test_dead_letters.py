"""Dead letters on the real services: they always fit, keep their original, and replay."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

from confluent_kafka.admin import AdminClient, NewTopic

from stockflow.applier import Applier
from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.deadletters import DeadLetterStore
from stockflow.dlq import original_of, read_dead_letters
from stockflow.ledger import Ledger
from stockflow.orders import Order, Restock
from stockflow.outcomes import Outcome, Source
from stockflow.pipeline import Pipeline
from stockflow.planner import Entry
from stockflow.producer import OrderProducer
from stockflow.worker import ensure_topics
from tests.integration.conftest import process

BIG = 1_000_000
"""Bytes of the large invalid message: the broker takes it (its limit is 1,048,588)."""


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, **settings.worker_environment()}
    return subprocess.run(
        [sys.executable, "-m", "stockflow", *args], env=env, capture_output=True, timeout=120
    )


def big_invalid_message() -> bytes:
    head = b'{"orderId": "big", "productId": 101, "quantity": 1, "pad": "'
    pad = os.urandom(BIG).hex().encode()[: BIG - len(head) - 2]
    message = head + pad + b'"}'
    assert len(message) == BIG
    return message


def test_a_message_near_the_size_limit_is_dead_lettered_and_its_neighbours_flow(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    big = big_invalid_message()
    # A producer whose limit is the broker's, not librdkafka's default (1,000,000 with framing).
    producer_config = {"message.max.bytes": 1_048_576, "compression.type": "none"}
    with OrderProducer(settings, **producer_config) as producer:  # type: ignore[arg-type]
        for number in range(3):
            producer.send(Order(f"before-{number}", 101, 1))
        producer.send_raw(big, key=b"101", headers={"trace": b"t-big"})
        for number in range(3):
            producer.send(Order(f"after-{number}", 101, 1))
    began = time.monotonic()
    run = process(settings, pipeline, 7, timeout=60)
    elapsed = time.monotonic() - began
    print(f"7 outcomes, one of a {BIG}-byte invalid message, in {elapsed:.1f}s")
    assert run.outcomes == {"applied": 6, "dead_lettered": 1}
    assert pipeline.inventory.stock_of(101) == 94
    assert elapsed < 30, f"the orders behind the large message took {elapsed:.1f}s"

    [letter] = read_dead_letters(settings)
    assert "exceeds" in letter.reason
    assert letter.truncated == ("value",)
    assert letter.size == BIG and letter.sha256 == hashlib.sha256(big).hexdigest()
    assert letter.value is not None and 900_000 < len(letter.value) < BIG
    assert big.startswith(letter.value)
    assert dict(letter.headers) == {"trace": b"t-big"}  # the original's headers still travel
    original = original_of(letter, DeadLetterStore(pipeline.mongo[settings.database]))
    assert original.value == big and original.key == b"101"

    shown = cli(settings, "dlq", "show", letter.ref, "--raw")
    assert shown.returncode == 0, shown.stderr
    assert hashlib.sha256(shown.stdout).hexdigest() == letter.sha256
    described = cli(settings, "dlq", "show", letter.ref)
    assert described.returncode == 0, described.stderr
    assert f"size:     {BIG} bytes (the topic's copy lacks: value)".encode() in described.stdout
    dry = cli(settings, "dlq", "replay", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would replay {letter.ref} ({letter.source}, {BIG} bytes)".encode() in dry.stdout
    assert b"dry run: 1 dead letter(s) would be replayed" in dry.stdout
    report = run_audit(settings, pipeline)
    assert report.ok and report.messages_checked == 7  # the dry run sent nothing

    # Replayed, the whole original travels again (and is dead-lettered again, still too big).
    replayed = cli(settings, "dlq", "replay", letter.ref)
    assert replayed.returncode == 0, replayed.stderr
    assert process(settings, pipeline, 1).outcomes == {"dead_lettered": 1}
    first, second = read_dead_letters(settings)
    assert second.size == BIG and second.sha256 == first.sha256
    report = run_audit(settings, pipeline)
    assert report.ok and report.replayed == 1 and report.outcomes["dead_lettered"] == 1


def test_stored_stock_of_odd_numeric_types_is_dead_lettered_at_once_or_used(
    settings: Settings, pipeline: Pipeline
) -> None:
    """A huge double, or the largest 64-bit integer with a restock on top (neither write would
    encode), dead-letters its product's commands with a reason at the first attempt (before:
    retried, then dead-lettered one by one); negative zero is a stock of 0. Neighbours flow.
    (Decimal128, also refused, is covered by the unit tests: FerretDB v1 cannot store it.)"""
    pipeline.inventory.seed({101: 1, 102: 1, 103: 1, 104: 5})
    odd = {101: 1e300, 102: 2**63 - 1, 103: -0.0}
    for pid, stock in odd.items():
        pipeline.inventory.products.update_one({"product_id": pid}, {"$set": {"stock": stock}})
    with OrderProducer(settings) as producer:
        producer.send(Order("o-1", 101, 1))
        producer.send(Restock("r-2", 102, 1))
        producer.send(Restock("r-3", 103, 2))
        producer.send(Order("o-4", 104, 1))
    started = time.monotonic()
    run = process(settings, pipeline, 4)
    assert run.outcomes == {"applied": 2, "dead_lettered": 2}
    assert time.monotonic() - started < 30  # no rounds of retries
    letters = {letter.reason for letter in read_dead_letters(settings)}
    assert len(letters) == 2 and all("unusable stock" in reason for reason in letters), letters
    assert "1e+300" in " ".join(letters)
    assert [pipeline.inventory.stock_of(p) for p in (103, 104)] == [2, 4]
    report = run_audit(settings, pipeline, messages=False)
    assert not report.stock_mismatches and not report.negative_stock, report


def test_an_applier_dead_letter_replays_once_fixed_and_is_applied_once(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10, 102: 10})
    pipeline.inventory.products.update_one({"product_id": 101}, {"$set": {"stock": "plenty"}})
    with OrderProducer(settings) as producer:
        producer.send(Order("o-1", 101, 2))
        producer.send(Order("o-2", 102, 1))
    assert process(settings, pipeline, 2).outcomes == {"applied": 1, "dead_lettered": 1}
    [letter] = read_dead_letters(settings)
    assert letter.stage == "applier" and "unusable stock" in letter.reason

    pipeline.inventory.products.update_one({"product_id": 101}, {"$set": {"stock": 10}})
    replayed = cli(settings, "dlq", "replay", letter.ref)
    assert replayed.returncode == 0, replayed.stderr
    assert b"replayed 1 dead letter(s)" in replayed.stdout
    run = process(settings, pipeline, 1)
    assert run.outcomes == {"applied": 1}, "a dead-lettered id's claim made its replay a duplicate"
    assert pipeline.inventory.stock_of(101) == 8
    report = run_audit(settings, pipeline)
    assert report.ok, report
    assert report.outcomes["applied"] == 2 and report.outcomes["dead_lettered"] == 0
    assert report.replayed == 1
    shown = cli(settings, "orders", "show", "o-1")
    assert shown.returncode == 0, shown.stderr
    assert b"applied" in shown.stdout
    assert f"dead-lettered (applier) from {letter.source}".encode() in shown.stdout

    # An id that was applied still makes a later copy a duplicate, and a second replay too.
    with OrderProducer(settings) as producer:
        producer.send(Order("o-1", 101, 2))
    again = cli(settings, "dlq", "replay", letter.ref)
    assert again.returncode == 0, again.stderr
    assert process(settings, pipeline, 2).outcomes == {"duplicate": 2}
    assert pipeline.inventory.stock_of(101) == 8
    report = run_audit(settings, pipeline)
    assert report.ok, report
    assert report.outcomes["duplicate"] == 2 and report.replayed == 1


def test_a_router_dead_letter_replays_corrected_and_the_audit_follows_it(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 10})
    with OrderProducer(settings) as producer:
        producer.send_raw(b'{"orderId": "r-1", "productId": "101", "quantity": 3}')
        producer.send_raw(b'{"orderId": "r-2", "productId": 101, "quantity": 0}')
    assert process(settings, pipeline, 2).outcomes == {"dead_lettered": 2}
    first, second = read_dead_letters(settings)
    assert first.stage == second.stage == "router"

    fixed = cli(
        settings,
        "dlq",
        "replay",
        first.ref,
        "--value",
        '{"orderId": "r-1", "productId": 101, "quantity": 3}',
    )
    assert fixed.returncode == 0, fixed.stderr
    as_is = cli(settings, "dlq", "replay", "--reason", "AT LEAST 1")  # replayed unchanged
    assert as_is.returncode == 0, as_is.stderr
    assert b"replayed 1 dead letter(s)" in as_is.stdout
    assert process(settings, pipeline, 2).outcomes == {"applied": 1, "dead_lettered": 1}
    assert pipeline.inventory.stock_of(101) == 7
    report = run_audit(settings, pipeline)
    assert report.ok, report
    # r-2 was dead-lettered twice: one final outcome, its second dead letter.
    assert report.outcomes["applied"] == 1 and report.outcomes["dead_lettered"] == 1
    assert report.replayed == 2 and report.messages_checked == 4

    # --all skips what was replayed before; only r-2's second dead letter is left.
    dry = cli(settings, "dlq", "replay", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert b"skipping 2 dead letter(s) replayed before" in dry.stdout
    assert b"dry run: 1 dead letter(s) would be replayed" in dry.stdout
    listed = cli(settings, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert b"3 dead letter(s) on" in listed.stdout and b"router" in listed.stdout


def test_dlq_replay_errors_are_one_line(settings: Settings, pipeline: Pipeline) -> None:
    ensure_topics(settings)
    for args, message in [
        ((), b"name the dead letters to replay"),
        (("0:99",), b"no dead letter 0:99"),
        (("nonsense",), b"not a dead letter ref: 'nonsense'"),
        (("--all", "--value", "{}"), b"--value replaces one dead letter; 0 selected"),
    ]:
        result = cli(settings, "dlq", "replay", *args)
        assert result.returncode == 1, result
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    shown = cli(settings, "dlq", "show", "0:5")
    assert shown.returncode == 1 and len(shown.stderr.strip().splitlines()) == 1


def test_a_redone_batch_with_a_dead_lettered_order_is_decided_again_not_as_a_duplicate(
    pipeline: Pipeline, settings: Settings
) -> None:
    """Crash after releasing a dead-lettered id's claim, before the Kafka commit: the batch is
    redone, and decides the same way (or applies it, if the product was fixed meanwhile)."""
    pipeline.inventory.seed({101: 10})
    pipeline.inventory.products.update_one({"product_id": 101}, {"$set": {"stock": "plenty"}})
    ledger = Ledger(
        pipeline.mongo[settings.database], settings.orders_collection, settings.restocks_collection
    )
    applier = Applier(settings, pipeline.inventory, ledger, pipeline.cache)
    copy_of = Order("same", 101, 2)
    entries = [
        Entry(Source("cmds", 0, 10), Source(settings.topic, 0, 0), copy_of),
        Entry(Source("cmds", 0, 11), Source(settings.topic, 0, 1), copy_of),  # a copy
    ]
    first = applier._apply(entries)
    again = applier._apply(entries)
    expected = [Outcome.DEAD_LETTERED, Outcome.DUPLICATE]
    assert [d.outcome for d in first] == [d.outcome for d in again] == expected
    pipeline.inventory.products.update_one({"product_id": 101}, {"$set": {"stock": 10}})
    fixed = applier._apply(entries)
    assert [d.outcome for d in fixed] == [Outcome.APPLIED, Outcome.DUPLICATE]
    assert pipeline.inventory.stock_of(101) == 8
    claims = pipeline.mongo[settings.database][f"{settings.orders_collection}_claims"]
    released = claims.find_one({"_id": "same@released@cmds[0]@10"})
    assert released is not None and released["duplicates"] == [f"{settings.topic}[0]@1"]
    # The copy is noted on both claims (the released one and the live one): one outcome.
    report = run_audit(settings, pipeline, messages=False)
    assert report.ok and report.outcomes["duplicate"] == 1, report


def test_a_dead_letter_the_broker_refuses_still_has_its_original_for_show_and_replay(
    settings: Settings, pipeline: Pipeline
) -> None:
    """A dead-letter topic whose own limit is lower than the producer's: the loop replaces the
    refused dead letter with one without payload; the original is still in dead_letters."""
    admin = AdminClient(settings.kafka_config())
    config = {"max.message.bytes": "20000"}
    topic = NewTopic(settings.dlq_topic, num_partitions=1, replication_factor=1, config=config)
    admin.create_topics([topic])[settings.dlq_topic].result(30)
    pipeline.inventory.seed({101: 10})
    invalid = (
        b'{"orderId": "wide", "productId": 101, "quantity": 1, "pad": ' + b" " * 30_000 + b"x}"
    )
    with OrderProducer(settings, **{"compression.type": "none"}) as producer:  # type: ignore[arg-type]
        producer.send(Order("a", 101, 1))
        producer.send_raw(invalid)
        producer.send(Order("b", 101, 1))
    assert process(settings, pipeline, 3, timeout=60).outcomes == {
        "applied": 2,
        "dead_lettered": 1,
    }
    [letter] = read_dead_letters(settings)
    assert letter.value is None and letter.truncated == ("value",)
    assert "too large or rejected" in letter.reason
    shown = cli(settings, "dlq", "show", letter.ref, "--raw")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == invalid
    assert run_audit(settings, pipeline).ok
