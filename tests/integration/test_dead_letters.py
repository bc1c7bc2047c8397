"""Dead letters on the real services: they always fit, keep their original, and replay."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.deadletters import DeadLetterStore
from stockflow.dlq import original_of, read_dead_letters
from stockflow.orders import Order
from stockflow.pipeline import Pipeline
from stockflow.producer import OrderProducer
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
