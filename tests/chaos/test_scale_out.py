"""Scaling out at size (``STOCKFLOW_CHAOS_SCALE`` of it in ``make test``):

- every non-default partitioning strategy: 50,000 orders produced with it over six input
  partitions, consumed by a pool of three worker processes (``stockflow consume --workers 3``)
  while they arrive. One product's orders reach several routers (round-robin, customer), or
  every order arrives three times (broadcast): the audit must be clean, no stock negative,
  every broadcast copy but one ``duplicate``;
- workers scaled 1 -> 3 -> 1 while orders flow (independent processes, as on several hosts):
  every message one outcome, audit clean;
- the same, abruptly: of three independent workers two are killed with ``kill -9`` one after
  the other, then a fresh one starts; and in a pool (``--workers 3``) one child is killed with
  ``kill -9`` and the supervisor restarts it. Every message one outcome, audit clean, no
  partition left behind; the figure line says how long after each kill every partition of
  both groups had a live owner again, and had moved again.

Nothing of the stack is broken here, so these runs are safe on a shared stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil
import pytest

from stockflow.audit import AuditReport, run_audit
from stockflow.config import Settings
from stockflow.errors import StockflowError
from stockflow.groups import describe_group
from stockflow.orders import Order
from stockflow.partitioning import make_partitioner
from stockflow.pipeline import open_pipeline
from stockflow.producer import OrderProducer
from stockflow.topics import create_topic, delete_topics

SCALE = float(os.environ.get("STOCKFLOW_CHAOS_SCALE", "0.1"))
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800)]
PARTITIONS = 6
PRODUCTS = 200


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


@dataclass(frozen=True)
class Sample:
    """One look at a group, ``at`` seconds into the run."""

    at: float
    state: str
    members: frozenset[str]
    owned: int
    """Partitions assigned to a member."""
    progress: tuple[tuple[int, int], ...]
    """Per partition: the committed offset (-1: none yet) and the lag."""


class GroupWatch:
    """Both stages' groups looked at twice a second, in a thread, for the whole run: how many
    members each had over time, and after a ``kill -9`` how long until every partition had a
    live owner again, and until every partition moved again."""

    def __init__(self, s: Settings, started: float) -> None:
        self.groups = {"router": s.router_group_id, "applier": s.group_id}
        self.samples: dict[str, list[Sample]] = {stage: [] for stage in self.groups}
        self.settings, self.started = s, started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-watch", daemon=True)

    def __enter__(self) -> GroupWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for stage, group in self.groups.items():
                at = self.now()  # the look starts: what it finds is so at this time or later
                try:
                    info = describe_group(self.settings, group)
                except StockflowError:
                    continue
                self.samples[stage].append(
                    Sample(
                        at,
                        info.state,
                        frozenset(m.member_id for m in info.members),
                        sum(p.owner is not None for p in info.partitions),
                        tuple(
                            (-1 if p.committed is None else p.committed, p.lag)
                            for p in info.partitions
                        ),
                    )
                )

    def now(self) -> float:
        return time.monotonic() - self.started

    def _before(self, stage: str, at: float) -> Sample | None:
        return next((x for x in reversed(self.samples[stage]) if x.at <= at), None)

    def wait(self, members: int, *, since: float, timeout: float = 90) -> dict[str, float]:
        """Wait until both groups are stable with ``members`` members, other than the ones
        they had at ``since``, owning every partition; the seconds from ``since`` to the first
        sample of each that showed it."""
        deadline = time.monotonic() + timeout
        seen: dict[str, float] = {}
        while len(seen) < len(self.groups):
            assert time.monotonic() < deadline, f"groups not back to {members} members: {seen}"
            for stage in self.groups:
                before = self._before(stage, since)
                last = self.samples[stage][-1] if self.samples[stage] else None
                if (
                    stage not in seen
                    and last is not None
                    and last.at > since
                    and last.state == "stable"
                    and len(last.members) == members
                    and last.owned == PARTITIONS
                    and (before is None or last.members != before.members)
                ):
                    seen[stage] = last.at - since
            time.sleep(0.2)
        return seen

    def moving(self, since: float, owned: Mapping[str, float]) -> dict[str, float | None]:
        """Seconds from ``since`` (a kill) until every partition of each group had committed
        past where it stood when it had a live owner again (``owned``, seconds after ``since``
        as :meth:`wait` returned them); None: one never did while it had something to read.
        The dead member's partitions move once its open transaction is aborted."""
        found: dict[str, float | None] = {}
        for stage in self.groups:
            after = [x for x in self.samples[stage] if x.at >= since + owned[stage]]
            found[stage] = None
            if not after:
                continue
            firsts: list[float | None] = []
            for i, (then, _) in enumerate(after[0].progress):
                moved = (x.at - since for x in after if x.progress[i:] and x.progress[i][0] > then)
                idle = after[-1].progress[i : i + 1] == ((then, 0),)  # nothing came to read
                firsts.append(next(moved, owned[stage] if idle else None))
            if None not in firsts:
                found[stage] = max(f for f in firsts if f is not None)
        return found

    def counts(self, stage: str, *, since: float) -> list[tuple[int, int]]:
        """(second, members) each time the stable membership of ``stage`` changed after
        ``since``."""
        changes: list[tuple[int, int]] = []
        for sample in self.samples[stage]:
            if sample.at < since or sample.state != "stable":
                continue
            if not changes or changes[-1][1] != len(sample.members):
                changes.append((round(sample.at), len(sample.members)))
        return changes


def audited(s: Settings) -> tuple[AuditReport, int]:
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
        negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
    return report, negative


def record(line: str) -> None:
    print(line)
    with Path(os.environ.get("STOCKFLOW_CHAOS_LOG", "/dev/null")).open("a") as out:
        out.write(line + "\n")


@pytest.mark.full_size_only  # short: test_chaos.py's kill -9 runs, integration/test_rebalance.py
def test_workers_killed_with_sigkill_mid_stream_then_one_started(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    """Three independent workers (as on three hosts); mid-stream one is killed with
    ``kill -9``, then a second (one left), then a fresh one starts: the survivors take over the
    dead members' partitions once Kafka expels them, and the books balance."""
    s = pipeline_settings
    orders = max(500, int(30_000 * SCALE))
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({pid: max(3, orders // PRODUCTS) for pid in range(1, PRODUCTS + 1)})
    env = {**os.environ, **s.worker_environment()}
    logs: list[BinaryIO] = []

    def start() -> subprocess.Popen[bytes]:
        logs.append((tmp_path / f"worker-{len(logs)}.log").open("wb"))
        return subprocess.Popen(
            [sys.executable, "-m", "stockflow", "consume", "--no-supervise", "--quiet"],
            env=env,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
        )

    def kill(worker: subprocess.Popen[bytes]) -> float:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        return watch.now()

    workers = [start(), start(), start()]
    producing = threading.Thread(
        target=produce, args=(s, "round-robin", {}, orders), kwargs={"rate": orders / 40}
    )
    started = time.monotonic()
    events: list[str] = []
    kills: list[tuple[float, dict[str, float]]] = []
    try:
        with GroupWatch(s, started) as watch:
            watch.wait(3, since=0)
            begun = watch.now()
            producing.start()
            time.sleep(6)
            for victim, left in ((workers[0], 2), (workers[1], 1)):
                killed = kill(victim)
                back = watch.wait(left, since=killed)
                kills.append((killed, back))
                events.append(f"kill -9 at {killed:.0f}s: owned again after {_seconds(back)}")
                time.sleep(3)
            joined = watch.now()
            workers.append(start())
            back = watch.wait(2, since=joined)
            events.append(f"one started at {joined:.0f}s: shared after {_seconds(back)}")
            producing.join()
            deadline = time.monotonic() + 120 + orders / 50
            while not settled(s, orders):
                assert time.monotonic() < deadline, f"not settled in time; see {tmp_path}"
                time.sleep(2)
            seconds = watch.now()
        counts = {stage: watch.counts(stage, since=begun) for stage in watch.groups}
        moving = [watch.moving(killed, back) for killed, back in kills]
        for i, moved in enumerate(moving):
            events[i] += f", moving again after {_seconds(moved)}"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        for log in logs:
            log.close()
    report, negative = audited(s)
    record(
        f"kill -9 of 2 of 3 workers, then 1 started: {orders} orders; {'; '.join(events)}; "
        f"members over time (s, n) {counts}; outcomes {dict(sorted(report.outcomes.items()))}; "
        f"discrepancies {report.discrepancies}; negative stock {negative}; {seconds:.0f}s"
    )
    assert [n for _, n in counts["applier"]] == [3, 2, 1, 2]
    assert [n for _, n in counts["router"]] == [3, 2, 1, 2]
    assert all(None not in moved.values() for moved in moving), "a partition stopped for good"
    assert report.ok, report
    assert negative == 0
    assert report.messages_checked == orders
    assert sum(report.outcomes.values()) == orders
    assert report.outcomes["applied"] + report.outcomes["insufficient_stock"] == orders


def _seconds(by_stage: Mapping[str, float | None]) -> str:
    return ", ".join(
        f"{stage} {'never' if seconds is None else f'{seconds:.1f}s'}"
        for stage, seconds in sorted(by_stage.items())
    )


@pytest.mark.full_size_only  # short: tests/integration/test_pool.py
def test_a_pool_worker_killed_with_sigkill_mid_stream_is_restarted(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    """``stockflow consume --workers 3``: one child killed with ``kill -9`` while orders flow
    is restarted by the supervisor, rejoins both groups, and nothing is lost or doubled."""
    s = pipeline_settings
    orders = max(500, int(20_000 * SCALE))
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed({pid: max(3, orders // PRODUCTS) for pid in range(1, PRODUCTS + 1)})
    log_path = tmp_path / "pool.log"
    log = log_path.open("wb")
    pool = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume", "--workers", "3", "--quiet"],
        env={**os.environ, **s.worker_environment()},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    supervisor = psutil.Process(pool.pid)

    def children() -> set[int]:
        alive = set()
        for child in supervisor.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.add(child.pid)
        return alive

    producing = threading.Thread(
        target=produce, args=(s, "round-robin", {}, orders), kwargs={"rate": orders / 20}
    )
    started = time.monotonic()
    try:
        with GroupWatch(s, started) as watch:
            watch.wait(3, since=0)
            begun = watch.now()
            first = children()
            assert len(first) == 3, first
            producing.start()
            time.sleep(5)
            victim = psutil.Process(sorted(first)[1])
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed = watch.now()
            deadline = time.monotonic() + 60
            while len(children() - first) != 1 or len(children()) != 3:
                assert time.monotonic() < deadline, f"no replacement: {children()} from {first}"
                time.sleep(0.2)
            replaced = watch.now() - killed
            back = watch.wait(3, since=killed)
            producing.join()
            deadline = time.monotonic() + 120 + orders / 50
            while not settled(s, orders):
                assert time.monotonic() < deadline, f"not settled in time; see {tmp_path}"
                time.sleep(2)
            seconds = watch.now()
            now = children()
        counts = {stage: watch.counts(stage, since=begun) for stage in watch.groups}
        moving = watch.moving(killed, back)
    finally:
        pool.send_signal(signal.SIGTERM)
        try:
            pool.wait(60)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait()
        log.close()
    said = log_path.read_text(errors="replace")
    report, negative = audited(s)
    record(
        f"pool of 3, one child kill -9 at {killed:.0f}s: {orders} orders; replacement running "
        f"after {replaced:.1f}s, every partition owned by 3 members after {_seconds(back)}, "
        f"moving again after {_seconds(moving)}; "
        f"members over time (s, n) {counts}; outcomes {dict(sorted(report.outcomes.items()))}; "
        f"discrepancies {report.discrepancies}; negative stock {negative}; {seconds:.0f}s"
    )
    assert pool.returncode == 0, said[-2000:]
    assert None not in moving.values(), "a partition stopped for good"
    assert victim.pid not in now and len(now & first) == 2, (first, now)
    assert len(re.findall(r"worker \d exited \(signal SIGKILL\); restarting in", said)) == 1, said
    assert report.ok, report
    assert negative == 0
    assert report.messages_checked == orders
    assert sum(report.outcomes.values()) == orders
    assert report.outcomes["applied"] + report.outcomes["insufficient_stock"] == orders
