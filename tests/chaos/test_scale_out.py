"""Scaling out at size (``STOCKFLOW_CHAOS_SCALE`` of it in ``make test``):

- every non-default partitioning strategy: 50,000 orders produced with it over six input
  partitions, consumed by a pool of three worker processes (``stockflow consume --workers 3``)
  while they arrive. One product's orders reach several routers (round-robin, customer), or
  every order arrives three times (broadcast): the audit must be clean, no stock negative,
  every broadcast copy but one ``duplicate``;
- workers scaled 1 -> 3 -> 1 while orders flow (independent processes, as on several hosts):
  every message one outcome, audit clean.

Nothing of the stack is broken here, so these runs are safe on a shared stack.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockflow.audit import run_audit
from stockflow.config import Settings, load_settings
from stockflow.errors import StockflowError
from stockflow.groups import describe_group
from stockflow.orders import Order
from stockflow.partitioning import make_partitioner
from stockflow.pipeline import open_pipeline
from stockflow.producer import OrderProducer
from stockflow.stack import Stack, take_back_own
from stockflow.topics import create_topic, delete_topics

SCALE = float(os.environ.get("STOCKFLOW_CHAOS_SCALE", "0.1"))
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800)]
PARTITIONS = 6
PRODUCTS = 200


@pytest.fixture(scope="module")
def base() -> Settings:
    settings, foreign = take_back_own(load_settings())
    if foreign:  # the chaos suite's rule (conftest.py), though nothing is broken here
        pytest.skip(
            "chaos runs use only the local stack's own services, and "
            + "; ".join(foreign)
            + ": unset it to run them on the local stack"
        )
    Stack(settings).up()
    return settings


@pytest.fixture
def pipeline_settings(base: Settings) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:8]
    s = base.model_copy(
        update={
            "topic": f"spread-{tag}",
            "database": f"stockflow_spread_{tag}",
            "cache_key_prefix": f"spread_{tag}_product_",
            "group_id": f"spread-{tag}",
            "commands_partitions": PARTITIONS,
        }
    )
    create_topic(s, s.topic, partitions=PARTITIONS)
    yield s
    try:
        delete_topics(s, [s.topic, s.commands_topic, s.dlq_topic, s.outcomes_topic])
        with open_pipeline(s, check=False) as pipeline:
            pipeline.mongo.drop_database(s.database)
    except Exception as exc:  # tidying up never decides a run
        print(f"could not tidy up after {s.topic}: {exc}")


def produce(s: Settings, name: str, options: dict[str, str], orders: int, rate: float) -> None:
    """Orders for 200 products (twice their stock), half with one of 1,000 customers."""
    rng = random.Random(11)
    strategy = make_partitioner(name, **options)  # type: ignore[arg-type]
    started = time.monotonic()
    with OrderProducer(s, partitioner=strategy, **{"linger.ms": 20}) as producer:
        for i in range(orders):
            customer = f"c{rng.randint(1, 1000)}" if i % 2 else None
            producer.send(Order(f"o{i}", rng.randint(1, PRODUCTS), rng.randint(1, 3), customer))
            if i % 100 == 0:
                ahead = i / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)


def settled(s: Settings, messages: int) -> bool:
    """The routers read everything and every message has its outcome."""
    try:
        if describe_group(s, s.router_group_id).lag:
            return False
    except StockflowError:
        return False
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline, messages=False)
    decided = sum(n for status, n in report.outcomes.items() if status != "pending")
    return decided >= messages and not report.pending


@pytest.mark.parametrize(
    ("name", "options", "copies"),
    [
        ("partition", {"partition": "4"}, 1),
        ("round-robin", {}, 1),
        ("customer", {}, 1),
        ("broadcast", {"partitions": "0,2,5"}, 3),
    ],
    ids=["partition", "round-robin", "customer", "broadcast"],
)
def test_a_strategy_at_scale_with_three_workers(
    pipeline_settings: Settings, tmp_path: Path, name: str, options: dict[str, str], copies: int
) -> None:
    s = pipeline_settings
    orders = max(500, int(50_000 * SCALE))
    if "partition" in options:
        options = {"partition": int(options["partition"])}  # type: ignore[dict-item]
    with open_pipeline(s) as pipeline:
        # About half the demand: stock runs out mid-stream, where an oversell would show.
        stock = max(3, orders // PRODUCTS)
        pipeline.inventory.seed({pid: stock for pid in range(1, PRODUCTS + 1)})
    log = (tmp_path / "pool.log").open("wb")
    pool = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume", "--workers", "3", "--quiet"],
        env={**os.environ, **s.worker_environment()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    try:
        # Orders arrive over 30 s at full size (3 s in make test's tenth), while workers run.
        produce(s, name, options, orders, rate=orders / max(3.0, 30 * SCALE))
        deadline = time.monotonic() + 900
        while not settled(s, orders * copies):
            assert time.monotonic() < deadline, f"not settled in time; see {tmp_path}"
            time.sleep(2)
        seconds = time.monotonic() - started
        members = len(describe_group(s, s.group_id).members)
    finally:
        pool.send_signal(signal.SIGTERM)
        try:
            pool.wait(60)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait()
        log.close()
    assert pool.returncode == 0, (tmp_path / "pool.log").read_text()[-2000:]
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
        negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
    line = (
        f"partitioner {name}: {orders} orders x {copies} over {PARTITIONS} partitions, 3 workers "
        f"({members} applier members at the end); outcomes "
        f"{dict(sorted(report.outcomes.items()))}; discrepancies {report.discrepancies}; "
        f"negative stock {negative}; {seconds:.0f}s"
    )
    print(line)
    with Path(os.environ.get("STOCKFLOW_CHAOS_LOG", "/dev/null")).open("a") as out:
        out.write(line + "\n")
    (tmp_path / f"{name}.json").write_text(json.dumps({"line": line}))
    assert report.ok, report
    assert negative == 0
    assert members == 3
    assert report.messages_checked == orders * copies
    assert report.outcomes["duplicate"] == orders * (copies - 1)
    assert report.outcomes["applied"] + report.outcomes["insufficient_stock"] == orders
    assert report.outcomes["insufficient_stock"] > 0


def test_workers_scaled_one_to_three_to_one_mid_stream(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    s = pipeline_settings
    orders = max(500, int(30_000 * SCALE))
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({pid: max(3, orders // PRODUCTS) for pid in range(1, PRODUCTS + 1)})
    env = {**os.environ, **s.worker_environment()}
    logs = []

    def start() -> subprocess.Popen[bytes]:
        logs.append((tmp_path / f"worker-{len(logs)}.log").open("wb"))
        return subprocess.Popen(
            [sys.executable, "-m", "stockflow", "consume", "--no-supervise", "--quiet"],
            env=env,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
        )

    def members() -> int:
        try:
            return len(describe_group(s, s.group_id).members)
        except StockflowError:
            return 0

    workers = [start()]
    counts: list[int] = []
    producing = threading.Thread(
        target=produce, args=(s, "round-robin", {}, orders), kwargs={"rate": orders / 40}
    )
    started = time.monotonic()
    try:
        producing.start()
        time.sleep(10)
        counts.append(members())
        workers += [start(), start()]  # scale up mid-stream
        time.sleep(12)
        counts.append(members())
        for worker in workers[1:]:  # and down again: they finish or abandon their batch
            worker.send_signal(signal.SIGTERM)
        for worker in workers[1:]:
            worker.wait(60)
            assert worker.returncode == 0
        producing.join()
        deadline = time.monotonic() + 900
        while not settled(s, orders):
            assert time.monotonic() < deadline, f"not settled in time; see {tmp_path}"
            time.sleep(2)
        counts.append(members())
        seconds = time.monotonic() - started
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()
        for log in logs:
            log.close()
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
        negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
    line = (
        f"scaling 1->3->1: {orders} orders, applier members {counts}; outcomes "
        f"{dict(sorted(report.outcomes.items()))}; discrepancies {report.discrepancies}; "
        f"negative stock {negative}; {seconds:.0f}s"
    )
    print(line)
    with Path(os.environ.get("STOCKFLOW_CHAOS_LOG", "/dev/null")).open("a") as out:
        out.write(line + "\n")
    assert counts == [1, 3, 1]
    assert report.ok, report
    assert negative == 0
    assert report.messages_checked == orders
    assert report.outcomes["applied"] + report.outcomes["insufficient_stock"] == orders
