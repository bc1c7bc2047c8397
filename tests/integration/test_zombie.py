"""A paused worker (a zombie) cannot finish its stale batch.

Two independent ``stockflow consume --no-supervise`` processes, A and B, share the partitions
of a pipeline while orders for a dozen hot products flow. A freezes (SIGSTOP) inside a batch,
after reading its products and before writing them (``paused_worker.py``), for longer than the
group session timeout: the group gives A's partitions to B, which applies A's batch and more
orders to the very products A was about to write, until every order sent has its outcome.
Then A is continued (SIGCONT) and tries to finish its batch. Its product writes must be
refused by the compare-and-set (nothing writes those products after it, so a stale write
that landed would stay, and the audit would see it) and its Kafka transaction fenced (its
offsets name a member the group has removed). A then rejoins and applies new orders as usual.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.errors import StockflowError
from stockflow.groups import describe_group
from stockflow.orders import Order
from stockflow.partitioning import RoundRobin
from stockflow.pipeline import open_pipeline
from stockflow.planner import MARKER, topic_entries
from stockflow.producer import OrderProducer
from tests.integration.conftest import cleanup, isolated, read_topic
from tests.integration.paused_worker import PREFIX

HOT = {pid: 100_000 for pid in range(1, 13)}
"""A dozen hot products over the three commands partitions; stock never runs out."""
PAUSE_NOTICED_MS = 6000
"""The workers' session timeout (the broker's smallest by default) and transaction timeout."""
PAUSED = Path(__file__).with_name("paused_worker.py")
FENCED = re.compile(
    r"applier: transaction failed \(.*(Unknown member|[Ii]llegal generation|fenced)"
)
"""The loop's line when the broker refuses the offsets of a member the group has removed."""


@pytest.fixture
def two_partitions(stack_settings: Settings) -> Iterator[Settings]:
    s = isolated(stack_settings, partitions=2)
    yield s
    cleanup(s)


class Orders(threading.Thread):
    """Orders for the hot products at a steady rate (round-robin over the input partitions),
    ids from ``first`` on, until ``halt`` is set; ``sent`` counts them."""

    def __init__(self, s: Settings, *, rate: float, first: int = 0) -> None:
        super().__init__(daemon=True)
        self.settings, self.rate, self.first = s, rate, first
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with OrderProducer(self.settings, partitioner=RoundRobin()) as producer:
            while not self.halt.wait(1 / self.rate):
                i = self.first + self.sent
                producer.send(Order(f"z{i}", 1 + i % len(HOT), 1 + i % 3))
                self.sent += 1

    def finish(self) -> int:
        self.halt.set()
        self.join(10)
        return self.sent


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds it took ``condition`` to hold; AssertionError after ``timeout``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if condition():
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def events(log: Path) -> list[dict[str, Any]]:
    """What the paused worker said about itself (``paused_worker.py``)."""
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line[len(PREFIX) :]) for line in lines if line.startswith(PREFIX)]


def owners(s: Settings, group: str) -> dict[str, list[int]]:
    """Each member's id -> its partitions (empty while Kafka knows no member)."""
    try:
        info = describe_group(s, group)
    except StockflowError:
        return {}
    return {m.member_id: [p for _, p in m.assignment] for m in info.members}


def committed(s: Settings, group: str) -> bool:
    """Whether ``group`` committed offsets on every partition of its topic."""
    try:
        info = describe_group(s, group)
    except StockflowError:
        return False
    return bool(info.partitions) and all(p.committed for p in info.partitions)


def overtaken(s: Settings, planned: list[dict[str, Any]]) -> bool:
    """Whether every product A planned to write was written since, past A's batch, by the
    partition A was writing it for."""
    with open_pipeline(s) as pipeline:
        for change in planned:
            doc = pipeline.inventory.products.find_one({"product_id": change["product"]})
            entries = topic_entries(doc.get(MARKER)) if doc else None
            last = [e["last"] for e in entries or [] if e["partition"] == change["partition"]]
            if not last or last[0] <= change["last"]:
                return False
    return True


def settled(s: Settings, sent: int) -> bool:
    """The routers read everything and every order has its outcome."""
    try:
        if describe_group(s, s.router_group_id).lag:
            return False
    except StockflowError:
        return False
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline, messages=False)
    decided = sum(n for status, n in report.outcomes.items() if status != "pending")
    return decided >= sent and not report.pending


def rejoined(told: list[dict[str, Any]]) -> bool:
    """Whether A's applier was given partitions again after it was continued."""
    resumed = next((i for i, e in enumerate(told) if e["event"] == "resumed"), len(told))
    return any(e["event"] == "assigned" and e["stage"] == "applier" for e in told[resumed:])


def split(told: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A's product writes after it was continued: those before its applier was given
    partitions again (its stale batch), and those after (new work)."""
    resumed = next(i for i, e in enumerate(told) if e["event"] == "resumed")
    stale: list[dict[str, Any]] = []
    after: list[dict[str, Any]] | None = None
    for event in told[resumed + 1 :]:
        if event["event"] == "assigned" and event["stage"] == "applier" and after is None:
            after = []
        elif event["event"] == "write":
            (stale if after is None else after).append(event)
    return stale, after or []


def test_a_paused_worker_resumed_after_losing_its_partitions_writes_and_commits_nothing(
    two_partitions: Settings, tmp_path: Path
) -> None:
    s = two_partitions
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed(HOT)
    env = {
        **os.environ,
        **s.worker_environment(),
        "STOCKFLOW_SESSION_TIMEOUT_MS": str(PAUSE_NOTICED_MS),
        # An open transaction of the frozen worker's router holds the commands it produced
        # back from every read_committed reader until the broker aborts it.
        "STOCKFLOW_TRANSACTION_TIMEOUT_MS": str(PAUSE_NOTICED_MS),
        "STOCKFLOW_LOG_TIMESTAMPS": "true",
    }
    trigger = tmp_path / "freeze"
    logs = {name: tmp_path / f"{name}.log" for name in "AB"}
    stats = {name: tmp_path / f"{name}.json" for name in "AB"}
    consume = ["consume", "--no-supervise", "--quiet"]
    commands = {
        "A": [sys.executable, str(PAUSED), str(trigger), "--", *consume],
        "B": [sys.executable, "-m", "stockflow", *consume],
    }
    before, later = Orders(s, rate=150), Orders(s, rate=150, first=100_000)
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, command in commands.items():
            with logs[name].open("wb") as out:
                workers[name] = subprocess.Popen(
                    [*command, "--stats-file", str(stats[name])],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
        a = psutil.Process(workers["A"].pid)
        before.start()
        wait_for(
            lambda: (
                sorted(map(len, owners(s, s.group_id).values())) == [1, 2]
                and len(owners(s, s.router_group_id)) == 2
            ),
            30,
            "both workers in both groups",
        )
        wait_for(lambda: committed(s, s.group_id), 30, "both appliers to commit")

        # A freezes at its next product write: its products read and planned, none written.
        trigger.touch()
        wait_for(lambda: a.status() == psutil.STATUS_STOPPED, 30, "A to freeze mid-batch")
        stopped = time.monotonic()
        [frozen] = [e for e in events(logs["A"]) if e["event"] == "frozen"]
        planned = frozen["changes"]

        # Once A's session expired, the group gives every partition to B, which applies A's
        # batch and more orders to the very products A was about to write, then all the rest.
        takeover = wait_for(
            lambda: list(owners(s, s.group_id).values()) == [[0, 1, 2]], 60, "B to take over"
        )
        wait_for(lambda: overtaken(s, planned), 30, "B to write past A's batch")
        sent = before.finish()
        wait_for(lambda: settled(s, sent), 60, "every order's outcome")
        paused = time.monotonic() - stopped

        a.resume()  # SIGCONT: A goes on with its stale batch
        fenced = wait_for(
            lambda: FENCED.search(logs["A"].read_text(errors="replace")),
            30,
            "A's stale transaction to be refused",
        )
        wait_for(
            lambda: (
                rejoined(events(logs["A"]))
                and sorted(map(len, owners(s, s.group_id).values())) == [1, 2]
            ),
            30,
            "A to rejoin",
        )
        later.start()  # and the pipeline goes on with both workers
        time.sleep(3)
        wait_for(lambda: split(events(logs["A"]))[1], 30, "A to apply new orders")
        sent += later.finish()
        wait_for(lambda: settled(s, sent), 60, "every order's outcome")
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
        for worker in workers.values():
            worker.wait(30)
    finally:
        before.halt.set()
        later.halt.set()
        for worker in workers.values():
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGCONT)
                worker.kill()
                worker.wait(10)
    log = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert workers["A"].returncode == 0, log["A"][-3000:]
    assert workers["B"].returncode == 0, log["B"][-3000:]
    done = {name: json.loads(path.read_text()) for name, path in stats.items()}
    stale, after = split(events(logs["A"]))
    print(
        f"A froze before writing {len(planned)} product(s), for {paused:.1f}s; B owned every "
        f"partition {takeover:.1f}s after the freeze; A's transaction refused {fenced:.1f}s "
        f"after SIGCONT; A's product writes refused by the compare-and-set: "
        f"{done['A']['refused_writes']}; {sent} orders, committed by A "
        f"{done['A']['applier']['messages']}, by B {done['B']['applier']['messages']}"
    )

    # Nothing of A's stale batch reached MongoDB: its write after the pause was refused
    # whole, and what it tried until its applier was given partitions again wrote nothing.
    assert stale and stale[0]["refused"] and stale[0]["products"] == len(planned), stale
    assert all(e["refused"] or e["products"] == 0 for e in stale), stale
    assert "refused by the compare-and-set" in log["A"]
    assert done["A"]["refused_writes"] >= len(planned)
    assert any(not e["refused"] and e["products"] for e in after), "A wrote nothing new"

    # Nothing of it reached Kafka: every order routed once, and one outcome event each.
    routed = Counter(
        dict(m.headers() or []).get("stockflow.source")  # type: ignore[attr-defined]
        for m in read_topic(s, s.commands_topic)
    )
    published = Counter(
        tuple(msgspec.json.decode(m.value())["source"])  # type: ignore[attr-defined]
        for m in read_topic(s, s.outcomes_topic)
    )
    assert {k: n for k, n in routed.items() if n > 1} == {}
    assert {k: n for k, n in published.items() if n > 1} == {}
    assert len(routed) == len(published) == sent

    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
        sold: Counter[int] = Counter()
        for record in pipeline.mongo[s.database][s.orders_collection].find({"status": "applied"}):
            sold[record["productId"]] += record["quantity"]
        stock = {d["product_id"]: d["stock"] for d in pipeline.inventory.products.find({})}
    assert report.ok, report
    assert report.messages_checked == sent
    assert report.outcomes["applied"] == sent
    assert stock == {pid: HOT[pid] - sold[pid] for pid in HOT}
