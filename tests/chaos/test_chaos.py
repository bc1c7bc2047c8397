"""Chaos scenarios: every message gets exactly one outcome and the books balance, whatever breaks.

``make chaos`` runs the full sizes (50,000 orders with five ``kill -9``); the test suite runs
the same scenarios smaller (``STOCKFLOW_CHAOS_SCALE``, default 0.1 here) so they keep working.
The faults act on the local stack's own services. Addresses exported by
``eval "$(stockflow stack env)"`` name those same services, so they are taken back as local;
a service that is really the user's own makes every scenario skip, saying which, and a run
in which every scenario skipped fails (``conftest.py``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stockflow.config import Settings
from stockflow.stack import Stack
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.kafka import KafkaService
from stockflow.stack.postgres import PostgresService
from stockflow.stack.redis import RedisService
from stockflow.stack.service import Service
from stockflow.testing import hung
from tests.chaos.harness import ChaosResult, Workers, local_stack, run_chaos, run_two_pipelines

SCALE = float(os.environ.get("STOCKFLOW_CHAOS_SCALE", "0.1"))
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def base() -> Iterator[Settings]:
    settings = local_stack(breaks=True)
    yield settings
    Stack(settings).up()  # leave everything running, whatever a scenario did


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


def n(full: int) -> int:
    return max(500, int(full * SCALE))


def check(result: ChaosResult) -> None:
    print(result.line())
    with Path(os.environ.get("STOCKFLOW_CHAOS_LOG", "/dev/null")).open("a") as log:
        log.write(result.line() + "\n")
    assert result.report is not None
    assert result.negative == 0
    assert result.stale_cache == 0
    assert result.report.discrepancies == 0, result.report
    assert result.ledger_mismatches == [], result.ledger_mismatches[:10]
    assert result.report.messages_checked == result.orders + result.restocks + result.malformed


def valid_dead_letters(result: ChaosResult) -> None:
    """Only the generated malformed messages may be dead-lettered: an outage is never a reason
    (a few "malformed" ones are valid by chance, so the bound is their number)."""
    assert result.report is not None
    letters = result.report.outcomes.get("dead_lettered", 0)
    assert letters <= result.malformed, f"{letters} dead letters for {result.malformed} malformed"


def outage(service: Service, after: float, down: float):  # type: ignore[no-untyped-def]
    def inject(s: Settings, pool: Workers, rng: random.Random, faults: list[str]) -> None:
        time.sleep(after)
        service.stop()
        faults.append(f"{service.name} stopped {down:.0f}s")
        time.sleep(down)
        _, pid = service.start(lambda _: None)
        service.wait_ready(pid)

    return inject


def test_kill_9_at_five_random_moments(base: Settings, log_dir: Path) -> None:
    orders = n(50_000)

    def kills(s: Settings, pool: Workers, rng: random.Random, faults: list[str]) -> None:
        moments = sorted(rng.uniform(3, 30) for _ in range(5))
        started = time.monotonic()
        for moment in moments:
            time.sleep(max(0.0, moment - (time.monotonic() - started)))
            pool.kill_one(rng)
            faults.append(f"kill -9 at {moment:.1f}s")

    check(run_chaos(base, "kill-9", orders=orders, faults=kills, rate=orders / 30, log_dir=log_dir))


def hang(service: Service, after: float, down: float):  # type: ignore[no-untyped-def]
    """SIGSTOP the service's whole process tree for ``down`` seconds: connections stay open
    and nothing answers (``stockflow.testing.hung``)."""

    def inject(s: Settings, pool: Workers, rng: random.Random, faults: list[str]) -> None:
        time.sleep(after)
        pid = service.running_pid()
        assert pid is not None, f"{service.name} is not running"
        with hung(pid) as tree:
            faults.append(f"{service.name} hung (SIGSTOP, {len(tree)} processes) {down:.0f}s")
            time.sleep(down)

    return inject


def postgres_behind_ferretdb(base: Settings) -> PostgresService:
    if base.ferretdb_backend != "postgresql":
        pytest.skip("STOCKFLOW_FERRETDB_BACKEND=sqlite: no PostgreSQL behind FerretDB to break")
    return PostgresService(base)


def test_mongodb_compatible_server_down_for_20s(base: Settings, log_dir: Path) -> None:
    orders = n(20_000)
    fault = outage(FerretDBService(base), after=4, down=20)
    check(
        run_chaos(
            base, "mongodb-down", orders=orders, faults=fault, rate=orders / 30, log_dir=log_dir
        )
    )


def test_redis_down_for_20s(base: Settings, log_dir: Path) -> None:
    orders = n(20_000)
    fault = outage(RedisService(base), after=4, down=20)
    check(
        run_chaos(
            base, "redis-down", orders=orders, faults=fault, rate=orders / 30, log_dir=log_dir
        )
    )


def test_kafka_broker_restarted(base: Settings, log_dir: Path) -> None:
    orders = n(20_000)
    fault = outage(KafkaService(base), after=5, down=3)
    check(
        run_chaos(
            base, "kafka-restart", orders=orders, faults=fault, rate=orders / 30, log_dir=log_dir
        )
    )


def test_three_consumers_with_hot_products_and_restocks(base: Settings, log_dir: Path) -> None:
    orders = n(30_000)
    check(
        run_chaos(
            base,
            "three-consumers",
            orders=orders,
            products=20,
            workers=3,
            restock_every=10,
            rate=orders / 20,
            log_dir=log_dir,
        )
    )


def test_thousands_of_malformed_messages_interleaved(base: Settings, log_dir: Path) -> None:
    orders = n(20_000)
    check(
        run_chaos(
            base, "malformed", orders=orders, malformed_every=5, rate=orders / 20, log_dir=log_dir
        )
    )


def test_database_behind_the_wire_server_stopped_for_20s(base: Settings, log_dir: Path) -> None:
    orders = n(20_000)
    fault = outage(postgres_behind_ferretdb(base), after=4, down=20)
    result = run_chaos(
        base, "postgres-down", orders=orders, faults=fault, rate=orders / 30, log_dir=log_dir
    )
    check(result)
    valid_dead_letters(result)


def test_database_behind_the_wire_server_hung_for_20s(base: Settings, log_dir: Path) -> None:
    orders = n(20_000)
    fault = hang(postgres_behind_ferretdb(base), after=4, down=20)
    result = run_chaos(
        base, "postgres-hung", orders=orders, faults=fault, rate=orders / 30, log_dir=log_dir
    )
    check(result)
    valid_dead_letters(result)


def test_two_pipelines_on_one_database_with_shared_products(base: Settings, log_dir: Path) -> None:
    """Two input topics, two groups and workers, one database, the same 20 products written by
    both at once, one kill -9 in each: every message of each topic one outcome, and every
    product's stock what both pipelines' recorded outcomes say."""
    orders = n(10_000)  # per pipeline

    def kills(pools: list[Workers], rng: random.Random, faults: list[str]) -> None:
        for i, pool in enumerate(pools):
            time.sleep(rng.uniform(3, 8))
            pool.kill_one(rng)
            faults.append(f"kill -9 in pipeline {i}")

    result = run_two_pipelines(
        base,
        "two-pipelines",
        orders=orders,
        products=20,
        faults=kills,
        rate=orders / 20,
        log_dir=log_dir,
    )
    check(result)
    valid_dead_letters(result)
