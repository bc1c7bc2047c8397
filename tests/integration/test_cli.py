"""The command line, run as a user runs it, against the real stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from stockflow.config import Settings
from stockflow.pipeline import Pipeline


def run(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "STOCKFLOW_TOPIC": settings.topic,
        "STOCKFLOW_DATABASE": settings.database,
        "STOCKFLOW_CACHE_KEY_PREFIX": settings.cache_key_prefix,
        "STOCKFLOW_GROUP_ID": settings.group_id,
        "STOCKFLOW_MAX_QUANTITY": str(settings.max_quantity),
    }
    return subprocess.run(
        [sys.executable, "-m", "stockflow", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_produce_then_consume_prints_the_seed_lines(settings: Settings, pipeline: Pipeline) -> None:
    seeded = run(settings, "products", "seed")
    assert seeded.returncode == 0, seeded.stderr
    produced = run(
        settings,
        "produce",
        '{"orderId": 1, "productId": 101, "quantity": 1}',
        "--file",
        "-",
        stdin='{"orderId": 3, "productId": 101, "quantity": 3}\n'
        '{"orderId": 4, "productId": 101, "quantity": 500}\n',
    )
    assert produced.returncode == 0, produced.stderr
    assert "3 delivered" in produced.stdout
    consumed = run(settings, "consume", "--idle-timeout", "6")
    assert consumed.returncode == 0, consumed.stderr
    lines = [line for line in consumed.stdout.splitlines() if "product 101" in line]
    assert lines[:4] == [
        "Processing order for product 101, quantity: 1",
        "Product stock updated for product 101, new stock: 99",
        "Processing order for product 101, quantity: 3",
        "Product stock updated for product 101, new stock: 96",
    ]
    assert lines[4] == "Processing order for product 101, quantity: 500"
    assert lines[5].startswith("Insufficient stock for product 101")
    assert pipeline.inventory.stock_of(101) == 96


def test_produce_refuses_invalid_orders_with_exit_1(settings: Settings) -> None:
    result = run(settings, "produce", '{"orderId": 1, "productId": "x", "quantity": 1}')
    assert result.returncode == 1
    assert "not sent" in result.stderr and "productId" in result.stderr


def test_produce_refuses_what_the_worker_would_dead_letter(settings: Settings) -> None:
    """One decoder, with the worker's limits, at every entry point."""
    limited = settings.model_copy(update={"max_quantity": 5})
    nested = '{"orderId": 2, "productId": 101, "quantity": 1, "x": ' + "[" * 1000 + "]" * 1000 + "}"
    result = run(limited, "produce", '{"orderId": 1, "productId": 101, "quantity": 6}', nested)
    assert result.returncode == 1, result.stdout
    assert "exceeds the maximum of 5" in result.stderr and "nested deeper" in result.stderr
    assert "0 delivered" in result.stdout and "Traceback" not in result.stderr


def test_demo_twice_tells_the_same_story(settings: Settings) -> None:
    for _ in range(2):
        result = run(settings, "demo", "--no-stack")
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "Product stock updated for product 101, new stock: 99" in out
        assert "Product stock updated for product 101, new stock: 96" in out
        assert "Insufficient stock for product 101" in out
        assert "Final stock of product 101: 96 (100 -> 99 -> 96 -> 96)" in out


def test_topics_create_and_list(settings: Settings) -> None:
    name = f"{settings.topic}-three"
    created = run(settings, "topics", "create", name, "--partitions", "3")
    assert created.returncode == 0 and "created" in created.stdout
    again = run(settings, "topics", "create", name, "--partitions", "3")
    assert again.returncode == 0 and "already exists" in again.stdout
    listed = run(settings, "topics", "list")
    row = next(line for line in listed.stdout.splitlines() if name in line)
    assert "3" in row.split(name, 1)[1]


def test_unreachable_mongodb_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stockflow", "products", "list"],
        env={
            **os.environ,
            "MONGODB_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "MongoDB at mongodb://127.0.0.1:9/" in result.stderr
    assert "not reachable" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_topic_is_a_clear_error(settings: Settings) -> None:
    for command in (
        ["consume", "--idle-timeout", "1"],
        ["produce", '{"orderId":1,"productId":1,"quantity":1}'],
    ):
        result = run(settings, *command, "--topic", f"{settings.topic}-missing")
        assert result.returncode == 1
        assert "does not exist" in result.stderr and "stockflow topics create" in result.stderr


def test_sigterm_stops_the_consumer_cleanly_and_keeps_its_progress(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    env = {
        **os.environ,
        "STOCKFLOW_TOPIC": settings.topic,
        "STOCKFLOW_DATABASE": settings.database,
        "STOCKFLOW_CACHE_KEY_PREFIX": settings.cache_key_prefix,
        "STOCKFLOW_GROUP_ID": settings.group_id,
        "STOCKFLOW_MAX_QUANTITY": str(settings.max_quantity),
    }
    consumer = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        produced = run(settings, "produce", '{"orderId": 1, "productId": 101, "quantity": 2}')
        assert produced.returncode == 0, produced.stderr
        assert consumer.stdout is not None
        lines = []
        for line in consumer.stdout:
            lines.append(line.strip())
            if line.startswith("Product stock updated"):
                break
        consumer.send_signal(signal.SIGTERM)
        _, err = consumer.communicate(timeout=15)
    finally:
        consumer.kill()
    assert consumer.returncode == 0, err
    assert "SIGTERM: stopping" in err
    assert lines[-1] == "Product stock updated for product 101, new stock: 98"
    # The offset was committed on the way out: a new member of the group finds nothing to redo.
    again = run(settings, "consume", "--idle-timeout", "3")
    assert again.returncode == 0 and "Processing order" not in again.stdout
    assert pipeline.inventory.stock_of(101) == 98
