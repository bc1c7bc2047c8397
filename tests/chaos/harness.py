"""Chaos runs: real worker processes, real faults, and the audit as the judge.

A run seeds products, produces a stream of orders (plus restocks and malformed messages) over
a multi-partition input topic, keeps one or more ``stockflow consume`` processes working on it,
injects faults (``kill -9``, stopping a service) while it flows, then waits until every message
has an outcome and checks the books with the audit.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from stockflow.audit import AuditReport, run_audit
from stockflow.config import Settings, load_settings
from stockflow.errors import StockflowError
from stockflow.orders import Order, Restock
from stockflow.outcomes import Outcome
from stockflow.pipeline import Pipeline, open_pipeline
from stockflow.producer import OrderProducer
from stockflow.stack import Stack, take_back_own
from stockflow.topics import create_topic, delete_topics, group_lag


def bad_message(rng: random.Random) -> bytes:
    """A generated bad message: broken, mistyped, injected, oversized or not text at all."""
    valid = {"orderId": f"bad-{rng.random()}", "productId": rng.randint(1, 9), "quantity": 1}
    kind = rng.randrange(7)
    if kind == 0:
        raw = json.dumps(valid).encode()
        return raw[: rng.randrange(len(raw))]  # truncated
    if kind == 1:
        field_ = rng.choice(list(valid))
        valid[field_] = rng.choice(["7", 1.5, None, True, [], -3, 10**9])  # type: ignore[assignment]
        return json.dumps(valid).encode()
    if kind == 2:
        valid[rng.choice(["productId", "quantity", "orderId"])] = {"$gt": 0}  # type: ignore[assignment]
        return json.dumps(valid).encode()
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    if kind == 4:
        del valid[rng.choice(list(valid))]  # type: ignore[misc]
        return json.dumps(valid).encode()
    if kind == 5:
        return json.dumps({**valid, "pad": "x" * 70_000}).encode()
    return rng.choice([b"", b"null", b"[]", b'"order"', b"\xff\xfe{}"])


@dataclass
class ChaosResult:
    """Counts of one run and the audit's verdict."""

    name: str
    orders: int
    restocks: int
    malformed: int
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: AuditReport | None = None
    negative: int = 0
    stale_cache: int = 0
    """Products whose read through the cache disagrees with MongoDB after the run."""
    ledger_mismatches: list[str] = field(default_factory=list)
    """Products whose stock is not seed + applied restocks - applied orders, summed over every
    recorded outcome (whichever pipeline recorded it): a check that needs no marker."""

    def line(self) -> str:
        r = self.report
        assert r is not None
        return (
            f"{self.name}: {self.orders} orders, {self.restocks} restocks, {self.malformed} "
            f"malformed; faults: {', '.join(self.faults) or 'none'}; outcomes "
            f"{dict(sorted(r.outcomes.items()))}; messages checked {r.messages_checked}; "
            f"discrepancies {r.discrepancies}; ledger mismatches {len(self.ledger_mismatches)}; "
            f"stale cache entries {self.stale_cache}; {self.seconds:.0f}s"
        )


SEED_STOCK = 50


def chaos_settings(base: Settings, *, partitions: int = 3) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = base.model_copy(
        update={
            "topic": f"chaos-{tag}",
            "database": f"stockflow_chaos_{tag}",
            "cache_key_prefix": f"chaos_{tag}_product_",
            "group_id": f"chaos-{tag}",
            "commands_partitions": 6,
        }
    )
    create_topic(s, s.topic, partitions=partitions)
    return s


def worker_env(s: Settings) -> dict[str, str]:
    return {
        **os.environ,
        **s.worker_environment(),
        "STOCKFLOW_MONGODB_TIMEOUT_MS": "2000",
        "STOCKFLOW_KAFKA_TIMEOUT_SECONDS": "10",
    }


class Workers:
    """``stockflow consume`` processes that can be killed and restarted; ``program`` runs
    them (default ``python -m stockflow``; the arguments from ``consume`` on are added)."""

    def __init__(
        self, s: Settings, count: int, log_dir: Path, program: Sequence[str] | None = None
    ) -> None:
        self.settings = s
        self.log_dir = log_dir
        self.program = list(program or [sys.executable, "-m", "stockflow"])
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[BinaryIO] = []
        for _ in range(count):
            self.start()

    def start(self) -> None:
        log = (self.log_dir / f"worker-{len(self.logs)}.log").open("ab")
        self.logs.append(log)
        self.procs.append(
            subprocess.Popen(
                [*self.program, "consume", "--quiet", "--no-supervise"],
                env=worker_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def revive(self) -> int:
        """Restart workers that exited on their own (a hung transaction ends in status 75)."""
        dead = [p for p in self.procs if p.poll() is not None]
        for proc in dead:
            self.procs.remove(proc)
            self.start()
        return len(dead)

    def kill_one(self, rng: random.Random) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.procs.remove(victim)
        self.start()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


def produce_stream(
    s: Settings,
    *,
    orders: int,
    id_prefix: str = "",
    products: int,
    restock_every: int,
    malformed_every: int,
    rng: random.Random,
    rate: float,
    halt: threading.Event | None = None,
) -> tuple[int, int, int]:
    """Produce orders (no key: any partition) with restocks and junk mixed in, at ``rate``/s;
    stops early once ``halt`` is set (what was produced so far is still counted)."""
    restocks = malformed = 0
    started = time.monotonic()
    # Generous delivery timeout: the broker-restart scenario keeps producing while it is down.
    config = {"linger.ms": 20, "message.max.bytes": 200_000, "message.timeout.ms": 300_000}
    with OrderProducer(s, **config) as producer:
        for i in range(orders):
            if halt is not None and i % 100 == 0 and halt.is_set():
                return i, restocks, malformed
            pid = rng.randint(1, products)
            producer.send_raw(Order(f"{id_prefix}o{i}", pid, rng.randint(1, 3)).encode())
            if restock_every and i % restock_every == 0:
                producer.send_raw(Restock(f"{id_prefix}r{i}", pid, rng.randint(5, 20)).encode())
                restocks += 1
            if malformed_every and i % malformed_every == 0:
                producer.send_raw(bad_message(rng))
                malformed += 1
            if rate and i % 100 == 0:
                ahead = i / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    return orders, restocks, malformed


def local_stack(*, breaks: bool) -> Settings:
    """The local stack's settings, its services started if needed; the scenario is skipped
    when an exported address names a service of someone else's, which chaos never touches
    (``breaks``: the scenario breaks services of the stack, not only uses them)."""
    settings, foreign = take_back_own(load_settings())
    if foreign:
        pytest.skip(
            f"chaos runs {'break' if breaks else 'use'} only the local stack's own services, and "
            + "; ".join(foreign)
            + ": unset it to run them on the local stack"
        )
    Stack(settings).up()
    return settings


class Producing:
    """``produce_stream`` calls in threads of their own, beside a scenario's faults. However
    the scenario ends, :meth:`stop` halts and joins them, so none outlives its scenario (one
    that did once failed the next scenario with its errors); :meth:`join` raises a thread's
    error in the scenario's own thread."""

    def __init__(self) -> None:
        self.halt = threading.Event()
        self.results: dict[int, tuple[int, int, int]] = {}
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def start(self, key: int, s: Settings, **stream: Any) -> None:
        def run() -> None:
            try:
                self.results[key] = produce_stream(s, halt=self.halt, **stream)
            except BaseException as exc:  # raised again by join()
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=f"producing-{key}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> dict[int, tuple[int, int, int]]:
        """Wait for every stream to end; (orders, restocks, malformed) of each, by key."""
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]
        return self.results

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(120)


def run_chaos(
    base: Settings,
    name: str,
    *,
    orders: int,
    products: int = 200,
    workers: int = 1,
    faults: Callable[[Settings, Workers, random.Random, list[str]], None] | None = None,
    restock_every: int = 50,
    malformed_every: int = 97,
    rate: float = 0,
    log_dir: Path,
    timeout: float = 600,
    seed: int = 7,
    program: Sequence[str] | None = None,
) -> ChaosResult:
    """Run one scenario to the end and audit it (``program``: how workers run, ``Workers``)."""
    rng = random.Random(seed)
    s = chaos_settings(base)
    started = time.monotonic()
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({pid: SEED_STOCK for pid in range(1, products + 1)})
    pool = Workers(s, workers, log_dir, program)
    result = ChaosResult(name, 0, 0, 0)
    producing = Producing()
    try:
        producing.start(
            0,
            s,
            orders=orders,
            products=products,
            restock_every=restock_every,
            malformed_every=malformed_every,
            rng=random.Random(seed + 1),
            rate=rate,
        )
        if faults is not None:
            faults(s, pool, rng, result.faults)
        produced = producing.join()[0]
        result.orders, result.restocks, result.malformed = produced
        total = sum(produced)
        if _wait_for_outcomes((s,), [pool], total, time.monotonic() + timeout):
            result.faults.append("a worker exited and was restarted")
        pool.stop()
        with open_pipeline(s) as pipeline:
            result.report = run_audit(s, pipeline)
            result.negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
            result.ledger_mismatches = ledger_mismatches(s, pipeline, SEED_STOCK)
            for product in pipeline.inventory.products.find({}):
                seen = pipeline.reader.lookup(int(product["product_id"]))
                if seen is None or seen["stock"] != product["stock"]:
                    result.stale_cache += 1
    finally:
        producing.stop()
        pool.stop()
        _tidy(s)
    result.seconds = time.monotonic() - started
    (log_dir / f"{name}.json").write_text(json.dumps({"line": result.line()}))
    return result


def _wait_for_outcomes(
    pipelines: tuple[Settings, ...], pools: list[Workers], total: int, deadline: float
) -> bool:
    """Wait until every router has committed its whole input topic and ``total`` messages have
    an outcome (the pipelines share one database). Revives workers that exited; True if any."""
    revived = False
    with open_pipeline(pipelines[0]) as pipeline:
        while deadline > time.monotonic():
            if any(pool.revive() for pool in pools):
                revived = True
            try:
                behind = sum(
                    sum(group_lag(s, s.router_group_id, s.topic).values()) for s in pipelines
                )
            except StockflowError:  # the broker is still coming back
                behind = 1
            if behind:
                time.sleep(1)
                continue
            report = run_audit(pipelines[0], pipeline, messages=False)
            decided = sum(v for k, v in report.outcomes.items() if k != "pending")
            letters = sum(_dead_letters(s) for s in pipelines)
            if decided + letters >= total and not report.pending:
                break
            time.sleep(3)
    return revived


def ledger_mismatches(s: Settings, pipeline: Pipeline, seed_stock: int) -> list[str]:
    """Products whose stock differs from ``seed_stock`` + applied restocks - applied orders."""
    database = pipeline.mongo[s.database]
    change: dict[int, int] = {}
    for name, sign in ((s.orders_collection, -1), (s.restocks_collection, 1)):
        for record in database[name].find({"status": "applied"}):
            pid = int(record["productId"])
            change[pid] = change.get(pid, 0) + sign * int(record["quantity"])
    found = []
    for product in pipeline.inventory.products.find({}):
        pid = int(product["product_id"])
        expected = seed_stock + change.get(pid, 0)
        if product.get("stock") != expected:
            found.append(f"product {pid}: stock {product.get('stock')}, expected {expected}")
    return found


def run_two_pipelines(
    base: Settings,
    name: str,
    *,
    orders: int,
    products: int,
    faults: Callable[[list[Workers], random.Random, list[str]], None] | None = None,
    rate: float,
    log_dir: Path,
    timeout: float = 600,
    seed: int = 11,
) -> ChaosResult:
    """Two pipelines (own input topics, groups and workers) on one database, writing the same
    products at the same time; the audit judges each topic's messages, and the stock of every
    product must match the outcomes recorded by both."""
    rng = random.Random(seed)
    first = chaos_settings(base)
    second = chaos_settings(base).model_copy(
        update={"database": first.database, "cache_key_prefix": first.cache_key_prefix}
    )
    pipelines = (first, second)
    started = time.monotonic()
    with open_pipeline(first) as pipeline:
        pipeline.inventory.seed({pid: SEED_STOCK for pid in range(1, products + 1)})
    pools = [Workers(s, 1, log_dir / f"pipeline-{i}") for i, s in enumerate(pipelines)]
    result = ChaosResult(name, 0, 0, 0)
    producing = Producing()
    try:
        for i, s in enumerate(pipelines):
            producing.start(
                i,
                s,
                orders=orders,
                id_prefix=f"p{i}-",
                products=products,
                restock_every=10,
                malformed_every=97,
                rng=random.Random(seed + 1 + i),
                rate=rate,
            )
        if faults is not None:
            faults(pools, rng, result.faults)
        produced = producing.join()
        result.orders = sum(p[0] for p in produced.values())
        result.restocks = sum(p[1] for p in produced.values())
        result.malformed = sum(p[2] for p in produced.values())
        total = sum(sum(p) for p in produced.values())
        if _wait_for_outcomes(pipelines, pools, total, time.monotonic() + timeout):
            result.faults.append("a worker exited and was restarted")
        for pool in pools:
            pool.stop()
        with open_pipeline(first) as pipeline:
            reports = [run_audit(s, pipeline) for s in pipelines]
            result.report = _merged(reports)
            result.negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
            result.ledger_mismatches = ledger_mismatches(first, pipeline, SEED_STOCK)
            for product in pipeline.inventory.products.find({}):
                seen = pipeline.reader.lookup(int(product["product_id"]))
                if seen is None or seen["stock"] != product["stock"]:
                    result.stale_cache += 1
    finally:
        producing.stop()
        for pool in pools:
            pool.stop()
        _tidy(second)
        _tidy(first)
    result.seconds = time.monotonic() - started
    (log_dir / f"{name}.json").write_text(json.dumps({"line": result.line()}))
    return result


def _merged(reports: list[AuditReport]) -> AuditReport:
    """One verdict for pipelines sharing a database: the records and products are shared (count
    them once), each topic's messages and dead letters are its own (add them up)."""
    first, rest = reports[0], reports[1:]
    merged = AuditReport(
        products_checked=first.products_checked,
        outcomes=first.outcomes.copy(),
        stock_mismatches=sorted({m for r in reports for m in r.stock_mismatches}),
        negative_stock=first.negative_stock,
        pending=first.pending,
    )
    for report in reports:
        merged.messages_checked += report.messages_checked
        merged.without_outcome += report.without_outcome
        merged.several_outcomes += report.several_outcomes
    for report in rest:
        merged.outcomes[Outcome.DEAD_LETTERED.value] += report.outcomes[Outcome.DEAD_LETTERED.value]
    return merged


def _tidy(s: Settings) -> None:
    """Drop the run's database and topics (the verdict and worker logs stay in log_dir)."""
    try:
        delete_topics(s, [s.topic, s.commands_topic, s.dlq_topic, s.outcomes_topic])
        with open_pipeline(s, check=False) as pipeline:
            pipeline.mongo.drop_database(s.database)
    except Exception as exc:  # tidying up never decides a scenario
        print(f"could not tidy up after {s.topic}: {exc}")


def _dead_letters(s: Settings) -> int:
    from stockflow.dlq import read_dead_letters

    try:
        return len(read_dead_letters(s))
    except Exception:
        return 0
