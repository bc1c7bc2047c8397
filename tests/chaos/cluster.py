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
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import KafkaException, TopicCollection

from stockflow.config import Settings
from stockflow.stack import Stack
from stockflow.stack.kafka import KafkaService, kafka_nodes
from stockflow.stack.process import is_alive, port_open
from stockflow.topics import TopicDescription, admin_client, describe_topic
from tests.chaos.harness import Workers

BROKERS = 3


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive ports nothing listens on or is bound to now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 30_000)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports found")


@dataclass
class Cluster:
    """A running private cluster: its settings and how long it took to come up."""

    settings: Settings
    start_seconds: float
    ports: list[int] = field(default_factory=list)

    def service(self, node_id: int) -> KafkaService:
        return KafkaService(self.settings, kafka_nodes(self.settings)[node_id - 1])

    def rss_mb(self) -> dict[int, int]:
        """Resident memory of each live broker, in MiB."""
        found = {}
        for node in kafka_nodes(self.settings):
            pid = self.service(node.node_id).running_pid()
            if pid is None:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[node.node_id] = int(line.split()[1]) // 1024
        return found


@contextmanager
def private_cluster(stack_settings: Settings, tmp_path: Path) -> Iterator[Cluster]:
    """Bring up three brokers of a state folder under ``tmp_path``; always bring them down."""
    for name in ("KAFKA_BOOTSTRAP_SERVERS",):
        if os.environ.get(name):
            pytest.skip(f"{name} is set: a private cluster needs the local Kafka")
    base = free_port_block(2 * BROKERS)
    env = {
        "STOCKFLOW_STATE_DIR": str(tmp_path / "cluster"),
        "STOCKFLOW_KAFKA_BROKERS": str(BROKERS),
        "STOCKFLOW_KAFKA_PORT": str(base),
        "STOCKFLOW_KAFKA_CONTROLLER_PORT": str(base + 1),
        "MONGODB_URI": stack_settings.mongodb_url,
        "REDIS_URL": stack_settings.redis_dsn,
    }
    settings = Settings(
        state_dir=tmp_path / "cluster",
        kafka_brokers=BROKERS,
        kafka_port=base,
        kafka_controller_port=base + 1,
        kafka_bootstrap_servers=None,
        mongodb_uri=stack_settings.mongodb_url,
        redis_url=stack_settings.redis_dsn,
    )
    stack = Stack(settings)
    pids: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)  # for the worker processes
        try:
            started = time.monotonic()
            results = stack.up()
            seconds = time.monotonic() - started
            assert [r.name for r in results if r.pid] == ["kafka-1", "kafka-2", "kafka-3"]
            yield Cluster(settings, seconds, list(range(base, base + 2 * BROKERS)))
        finally:
            pids = [p for p in (s.running_pid() for s in stack.services) if p is not None]
            down = stack.down()
    assert {r.name: r.action for r in down if r.name.startswith("kafka-")} == {
        f"kafka-{i}": "stopped" for i in range(1, BROKERS + 1)
    }, down
    assert not any(is_alive(pid) for pid in pids)
    for port in range(base, base + 2 * BROKERS):
        assert not port_open("127.0.0.1", port), f"port {port} still open"


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
