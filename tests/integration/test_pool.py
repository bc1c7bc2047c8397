"""``stockflow consume --workers N``: a pool of worker processes under one supervisor, on the
real stack. Each child is a member of both stages' groups; a child killed with SIGKILL is
restarted and nothing is lost or applied twice; one SIGTERM stops them all, and none outlives
the supervisor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from stockflow.audit import run_audit
from stockflow.config import Settings
from stockflow.groups import describe_group
from stockflow.orders import Order
from stockflow.partitioning import RoundRobin
from stockflow.pipeline import open_pipeline
from stockflow.producer import OrderProducer
from tests.integration.conftest import cleanup, isolated

PRODUCTS = {pid: 100 for pid in range(1, 11)}


@pytest.fixture
def three(stack_settings: Settings) -> Iterator[Settings]:
    s = isolated(stack_settings, partitions=3)
    yield s
    cleanup(s)


def send(s: Settings, first: int, count: int, rate: float = 0) -> None:
    with OrderProducer(s, partitioner=RoundRobin()) as producer:
        for i in range(first, first + count):
            producer.send(Order(f"o{i}", 1 + i % len(PRODUCTS), 1 + i % 3))
            if rate:
                time.sleep(1 / rate)


def decided(s: Settings) -> int:
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline, messages=False)
    return sum(n for status, n in report.outcomes.items() if status != "pending")


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def children(supervisor: psutil.Process) -> list[psutil.Process]:
    return [c for c in supervisor.children() if c.is_running() and c.status() != "zombie"]


def test_a_pool_of_three_consumes_restarts_a_killed_worker_and_stops_on_one_sigterm(
    three: Settings,
) -> None:
    s = three
    with open_pipeline(s) as pipeline:
        pipeline.inventory.seed(PRODUCTS)
    send(s, 0, 300)
    env = {**os.environ, **s.worker_environment()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume", "--workers", "3", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    supervisor = psutil.Process(proc.pid)
    first: list[psutil.Process] = []
    try:
        wait_for(lambda: len(children(supervisor)) == 3, 30, "three workers")
        first = children(supervisor)
        wait_for(lambda: decided(s) >= 300, 120, "the first 300 orders")
        # Every child is a member of both stages' groups.
        wait_for(
            lambda: (
                len(describe_group(s, s.group_id).members) == 3
                and len(describe_group(s, s.router_group_id).members) == 3
            ),
            60,
            "three members in each group",
        )
        producing = threading.Thread(target=send, args=(s, 300, 300, 200))
        producing.start()
        time.sleep(0.5)
        victim = first[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        wait_for(
            lambda: (
                len(children(supervisor)) == 3
                and victim.pid not in {c.pid for c in children(supervisor)}
            ),
            30,
            "the killed worker's replacement",
        )
        producing.join()
        wait_for(lambda: decided(s) >= 600, 180, "all 600 orders")
        pool = children(supervisor)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        _, alive = psutil.wait_procs(pool + first, timeout=15)
        assert not alive, f"workers outlived the supervisor: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for child in first:
            if child.is_running():
                child.kill()
    assert re.search(r"worker \d exited \(signal SIGKILL\); restarting in", err), err
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
        negative = pipeline.inventory.products.count_documents({"stock": {"$lt": 0}})
    assert report.ok, report
    assert negative == 0
    assert report.messages_checked == 600
    assert sum(report.outcomes.values()) == 600


def test_a_pool_is_done_when_every_worker_is(tmp_path: object) -> None:
    from pathlib import Path

    from stockflow.supervisor import supervise

    runs = Path(str(tmp_path))
    script = "import os, sys, pathlib; pathlib.Path(sys.argv[-1], str(os.getpid())).touch()"
    said: list[str] = []
    status = supervise(
        [str(runs)], say=said.append, command=[sys.executable, "-c", script], workers=3
    )
    assert status == 0 and said == []
    assert len(list(runs.iterdir())) == 3


def test_a_worker_giving_up_stops_the_whole_pool(tmp_path: object) -> None:
    """One worker's configuration error (78) would be every worker's: the others are stopped."""
    from pathlib import Path

    from stockflow.errors import EXIT_CONFIG
    from stockflow.supervisor import supervise

    first = Path(str(tmp_path)) / "first"
    script = (
        "import os, sys, time\n"
        "try:\n"
        f"    os.close(os.open(sys.argv[-1], os.O_CREAT | os.O_EXCL)); sys.exit({EXIT_CONFIG})\n"
        "except FileExistsError:\n"
        "    time.sleep(60)\n"
    )
    said: list[str] = []
    began = time.monotonic()
    status = supervise(
        [str(first)], say=said.append, command=[sys.executable, "-c", script], workers=3
    )
    assert status == EXIT_CONFIG and time.monotonic() - began < 20
    assert any("configuration error" in line for line in said)
    assert any("stopping the other workers" in line for line in said)


def test_no_worker_of_a_pool_outlives_a_supervisor_killed_with_sigkill(three: Settings) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume", "--workers", "3", "--quiet"],
        env={**os.environ, **three.worker_environment()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    supervisor = psutil.Process(proc.pid)
    pool: list[psutil.Process] = []
    try:
        wait_for(lambda: len(children(supervisor)) == 3, 30, "three workers")
        pool = children(supervisor)
        time.sleep(3)  # let them get going (pipeline open, groups joined)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _, alive = psutil.wait_procs(pool, timeout=20)
        assert not alive, f"workers outlived their supervisor: {alive}"
    finally:
        for child in pool:
            if child.is_running():
                child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
