"""``stockflow topics describe`` and ``stockflow groups``, as an operator runs them, on the real
Kafka: what they show is what the topic holds and what the groups have done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from stockflow.config import Settings
from stockflow.orders import Order
from stockflow.partitioning import RoundRobin, ToPartition
from stockflow.pipeline import Pipeline
from stockflow.planner import Decision
from stockflow.producer import OrderProducer
from stockflow.worker import Worker
from tests.integration.conftest import isolated


def stockflow(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockflow", *args],
        env={**os.environ, **s.worker_environment()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1
    assert text in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_topics_describe_shows_partitions_replicas_and_end_offsets(settings: Settings) -> None:
    s = isolated(settings, partitions=3).model_copy(update={"topic": f"{settings.topic}-3"})
    from stockflow.topics import create_topic

    create_topic(s, s.topic, partitions=3)
    with OrderProducer(s, partitioner=ToPartition(1)) as producer:
        for i in range(5):
            producer.send(Order(i, 101, 1))
    with OrderProducer(s, partitioner=ToPartition(2)) as producer:
        producer.send(Order(9, 101, 1))
    described = as_json(stockflow(s, "topics", "describe", s.topic, "--json"))
    assert described["name"] == s.topic and described["topic_id"]
    partitions = described["partitions"]
    assert [p["partition"] for p in partitions] == [0, 1, 2]
    assert [p["end_offset"] for p in partitions] == [0, 5, 1]
    for p in partitions:
        assert p["leader"] in p["replicas"] and p["leader"] in p["in_sync"]
    table = stockflow(s, "topics", "describe", s.topic)
    assert table.returncode == 0 and "in-sync" in table.stdout and "3 partition(s)" in table.stdout
    from stockflow.topics import delete_topics

    delete_topics(s, [s.topic])


def test_topics_describe_of_a_missing_topic_is_one_line(settings: Settings) -> None:
    result = stockflow(settings, "topics", "describe", f"{settings.topic}-missing")
    assert_one_line_error(result, f"topic '{settings.topic}-missing' does not exist")


def test_groups_show_members_assignments_committed_offsets_and_lag(
    stack_settings: Settings,
) -> None:
    from stockflow.pipeline import open_pipeline
    from tests.integration.conftest import cleanup

    s = isolated(stack_settings, partitions=3)
    try:
        with open_pipeline(s) as pipeline:
            _run(s, pipeline)
    finally:
        cleanup(s)


def _run(s: Settings, pipeline: Pipeline) -> None:
    pipeline.inventory.seed({101: 100, 102: 100})
    with OrderProducer(s, partitioner=RoundRobin()) as producer:
        for i in range(30):
            producer.send(Order(i, 101 + i % 2, 1))
    decided: list[Decision] = []
    worker = Worker(s, pipeline, listener=decided.append)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(decided) < 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(decided) == 30
        time.sleep(1)  # the last commit
        router, applier = as_json(stockflow(s, "groups", "--json"))
    finally:
        worker.stop()
        thread.join(30)
    assert (router["group_id"], router["stage"]) == (s.router_group_id, "router")
    assert (applier["group_id"], applier["stage"]) == (s.group_id, "applier")
    for group, topic in ((router, s.topic), (applier, s.commands_topic)):
        assert group["state"] == "stable"
        (member,) = group["members"]
        assert sorted(map(tuple, member["assignment"])) == [(topic, p) for p in range(3)]
        assert [(r["topic"], r["partition"]) for r in group["partitions"]] == [
            (topic, p) for p in range(3)
        ]
        for row in group["partitions"]:
            assert row["owner"] == member["client_id"]
            if row["end_offset"] == 0:  # a commands partition no product of the test hashes to
                assert row["committed"] is None and row["lag"] == 0
            else:
                assert row["committed"] is not None and row["committed"] <= row["end_offset"]
    # The input topic has no transaction markers: all read, nothing behind.
    assert [r["committed"] for r in router["partitions"]] == [10, 10, 10]
    assert router["lag"] == 0
    # The commands topic is written in transactions: its end offsets count commit markers.
    assert sum(r["committed"] or 0 for r in applier["partitions"]) >= 30
    assert all(r["lag"] <= 1 for r in applier["partitions"])

    # With the worker gone: no members, and the orders sent since are the router's lag.
    with OrderProducer(s, partitioner=RoundRobin()) as producer:
        for i in range(30, 37):
            producer.send(Order(i, 101, 1))
    router, applier = as_json(stockflow(s, "groups", s.group_id, "--json"))
    assert router["members"] == [] and router["lag"] == 7
    assert [r["end_offset"] - r["committed"] for r in router["partitions"]] == [3, 2, 2]
    table = stockflow(s, "groups")
    assert table.returncode == 0, table.stderr
    assert f"{s.router_group_id} (router stage)" in table.stdout and "lag 7" in table.stdout


def test_groups_of_a_missing_group_is_one_line(settings: Settings) -> None:
    result = stockflow(settings, "groups", "no-such-group")
    assert_one_line_error(result, "'no-such-group-router' and 'no-such-group' do not exist")
