"""A private three-broker cluster: replicated topics, and a broker killed mid-stream.

The cluster (its own state folder and free ports) shares nothing with the local stack the
other tests use, which is never stopped; MongoDB and Redis are the local stack's, used under
this test's own names. The long version is ``tests/chaos/test_cluster.py``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import ConfigResource

from stockflow.config import Settings
from stockflow.errors import StackError, TopicError
from stockflow.stack import Stack
from stockflow.topics import admin_client, describe_topic
from tests.chaos.cluster import Cluster, LeaderChange, describe_lines, kill_leader, private_cluster
from tests.chaos.harness import Workers, run_chaos

pytestmark = pytest.mark.timeout(300)


def _min_isr(s: Settings, topic: str) -> str:
    resource = ConfigResource("topic", topic)
    admin = admin_client(s)  # kept alive until the future is done
    future = admin.describe_configs([resource], request_timeout=30)[resource]
    return str(future.result()["min.insync.replicas"].value)


def _replicated(cluster: Cluster, seen: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    """A fault step: every topic of the pipeline is on all three brokers, all in sync."""

    def check(s: Settings, pool: Workers, rng: random.Random, faults: list[str]) -> None:
        topics = [s.topic, s.commands_topic, s.outcomes_topic, s.dlq_topic]
        deadline = time.monotonic() + 60
        for topic in topics:
            while True:
                try:
                    d = describe_topic(s, topic)
                    break
                except TopicError:  # the workers create the internal topics as they start
                    assert time.monotonic() < deadline, f"{topic} never created"
                    time.sleep(0.5)
            seen[topic] = describe_lines(d)
            for p in d.partitions:
                assert sorted(p.replicas) == [1, 2, 3], seen[topic]
                assert sorted(p.in_sync) == [1, 2, 3], seen[topic]
            assert _min_isr(s, topic) == "2"

    return check


def test_a_killed_partition_leader_loses_no_acknowledged_order(
    stack_settings: Settings, tmp_path: Path
) -> None:
    changes: list[LeaderChange] = []
    topics: dict[str, list[str]] = {}
    with private_cluster(stack_settings, tmp_path) as cluster:
        rss = cluster.rss_mb()
        assert len(rss) == 3
        replicated = _replicated(cluster, topics)
        kill = kill_leader(cluster, changes, after_messages=150, down_seconds=3)

        def faults(s: Settings, pool: Workers, rng: random.Random, log: list[str]) -> None:
            replicated(s, pool, rng, log)
            kill(s, pool, rng, log)

        result = run_chaos(
            cluster.settings,
            "cluster-kill-leader",
            orders=600,
            products=50,
            workers=2,
            rate=60,
            faults=faults,
            log_dir=tmp_path / "logs",
            timeout=180,
        )
        rss_after = cluster.rss_mb()
        # Settings of one broker on the same folder see the cluster and leave it alone.
        one = cluster.settings.model_copy(update={"kafka_brokers": 1})
        with pytest.raises(StackError, match="another Kafka layout"):
            Stack(one).up()
        assert [r.name for r in Stack(one).status() if r.running and r.mode == "local"] == [
            "kafka-1", "kafka-2", "kafka-3"
        ]  # fmt: skip
    (change,) = changes
    note = [
        f"cluster up in {cluster.start_seconds:.1f}s, RSS MiB {rss}, after the run {rss_after}",
        *(f"{t}: {lines}" for t, lines in topics.items()),
        f"killed broker {change.victim}; new leader {change.new_leader} after "
        f"{change.failover_seconds:.1f}s",
        "before:",
        *change.before,
        "after:",
        *change.after,
        "restarted:",
        *change.restarted,
        result.line(),
    ]
    print("\n".join(note))
    with Path(os.environ.get("STOCKFLOW_CHAOS_LOG", "/dev/null")).open("a") as log:
        log.write("\n".join(note) + "\n")
    assert change.new_leader not in (None, change.victim)
    assert f"leader {change.victim}," in change.before[0]
    in_sync_after = change.after[0].split("in-sync ")[1].split(", end offset")[0].split(",")
    assert str(change.victim) not in in_sync_after, change.after
    assert result.report is not None
    assert result.report.discrepancies == 0, result.report
    assert result.negative == 0 and result.stale_cache == 0
    assert result.ledger_mismatches == []
    # Every message the producer had acknowledged reached exactly one outcome.
    assert result.report.messages_checked == result.orders + result.restocks + result.malformed
