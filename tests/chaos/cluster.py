"""A private three-broker Kafka cluster for runs that kill brokers, and the fault that does it.

The cluster has its own state folder and free ports and shares nothing with the local stack
other tests use; MongoDB and Redis are the local stack's (or the user's), which these runs
only read and write under their own names. Worker processes find the cluster through the
environment, which :func:`private_cluster` points at it while it runs.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, TopicCollection

from stockflow.config import Settings
from stockflow.stack import Stack
from stockflow.testing import PrivateKafka, private_kafka
from stockflow.topics import TopicDescription, admin_client, describe_topic
from tests.chaos.harness import Workers

BROKERS = 3

Cluster = PrivateKafka


@contextmanager
def private_cluster(stack_settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    """Bring up three brokers of a state folder under ``tmp_path``; always bring them down
    (and fail if one survives or a port stays open). Worker processes started meanwhile find
    the cluster through the environment."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("KAFKA_BOOTSTRAP_SERVERS is set: a private cluster needs the local Kafka")
    with (
        private_kafka(stack_settings, tmp_path / "cluster", brokers=BROKERS) as cluster,
        pytest.MonkeyPatch.context() as mp,
    ):
        for key, value in cluster.environment().items():
            mp.setenv(key, value)  # for the worker processes
        yield cluster


def describe_lines(d: TopicDescription) -> list[str]:
    """``topics describe`` as text lines: partition, leader, replicas, in-sync, end offset."""
    return [
        f"partition {p.partition}: leader {p.leader}, replicas "
        f"{','.join(map(str, p.replicas))}, in-sync {','.join(map(str, p.in_sync))}, "
        f"end offset {p.end_offset}"
        for p in d.partitions
    ]


def _leader(s: Settings, topic: str) -> int | None:
    """The leader of ``topic``'s partition 0 as the cluster's metadata says now (no end
    offsets: asking a dead leader for them waits for the request timeout)."""
    admin = admin_client(s)
    future = admin.describe_topics(TopicCollection([topic]), request_timeout=5)[topic]
    try:
        partitions = future.result().partitions
    except KafkaException:
        return None
    leader = next(p.leader for p in partitions if p.id == 0)
    return None if leader is None else int(leader.id)


@dataclass
class LeaderChange:
    """What killing the input topic's partition-0 leader did."""

    victim: int
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    new_leader: int | None = None
    failover_seconds: float = 0.0


def kill_leader(
    cluster: Cluster,
    record: list[LeaderChange],
    *,
    after_messages: int,
    down_seconds: float,
    kills: int = 1,
) -> Callable[[Settings, Workers, random.Random, list[str]], None]:
    """A fault for ``run_chaos``: once ``after_messages`` orders are in (twice that for the
    second kill, ...), ``kill -9`` the leader
    of the input topic's partition 0, record ``topics describe`` before and after the new
    leader is elected, restart the node ``down_seconds`` later and wait until it is back in
    sync; ``kills`` times."""

    def inject(s: Settings, pool: Workers, rng: random.Random, faults: list[str]) -> None:
        for kill in range(kills):
            wanted = (kill + 1) * after_messages
            deadline = time.monotonic() + 120
            while describe_topic(s, s.topic).messages < wanted:
                assert time.monotonic() < deadline, "the stream never started"
                time.sleep(0.2)
            before = describe_topic(s, s.topic)
            victim = before.partitions[0].leader
            assert victim is not None
            change = LeaderChange(victim, describe_lines(before))
            pid = cluster.service(victim).running_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            faults.append(f"kill -9 broker {victim} (leader of {s.topic}[0])")
            while True:
                leader = _leader(s, s.topic)
                if leader is not None and leader != victim:
                    break
                assert time.monotonic() - killed_at < 60, "no new leader within 60 s"
                time.sleep(0.2)
            change.failover_seconds = time.monotonic() - killed_at
            change.new_leader = leader
            change.after = describe_lines(describe_topic(s, s.topic))
            time.sleep(down_seconds)
            Stack(cluster.settings).up()  # starts the killed node, leaves the others alone
            faults.append(f"broker {victim} restarted")
            deadline = time.monotonic() + 120
            while True:
                back = describe_topic(s, s.topic)
                if all(victim in p.in_sync for p in back.partitions):
                    break
                assert time.monotonic() < deadline, "the restarted broker never caught up"
                time.sleep(0.5)
            change.restarted = describe_lines(back)
            record.append(change)

    return inject
