"""Helpers for runs beside the local stack (tests, chaos runs, benchmarks): free ports, and a
private Kafka -- one broker or a KRaft cluster -- that shares nothing with the local stack.

A private Kafka has its own state folder and ports; MongoDB and Redis stay those of the
settings it is started from, which the run uses under its own names. Child processes (workers)
find it through :meth:`PrivateKafka.environment`.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from stockflow.config import Settings
from stockflow.errors import StackError
from stockflow.stack import Stack
from stockflow.stack.kafka import KafkaService, kafka_nodes
from stockflow.stack.process import is_alive, port_open


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
class PrivateKafka:
    """A running private Kafka: its settings, how long it took to come up, its ports."""

    settings: Settings
    start_seconds: float
    ports: list[int] = field(default_factory=list)

    def service(self, node_id: int) -> KafkaService:
        return KafkaService(self.settings, kafka_nodes(self.settings)[node_id - 1])

    def pids(self) -> dict[str, int]:
        """The pid of each live node, by node name (``kafka``, or ``kafka-1`` ...)."""
        found = {}
        for node in kafka_nodes(self.settings):
            pid = KafkaService(self.settings, node).running_pid()
            if pid is not None:
                found[node.name] = pid
        return found

    def rss_mb(self) -> dict[int, int]:
        """Resident memory of each live node, in MiB, by node id."""
        found = {}
        for node in kafka_nodes(self.settings):
            pid = self.service(node.node_id).running_pid()
            if pid is None:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    found[node.node_id] = int(line.split()[1]) // 1024
        return found

    def environment(self) -> dict[str, str]:
        """The variables that point a ``stockflow`` child process at this Kafka (and at the
        MongoDB and Redis of the settings it was started from)."""
        s = self.settings
        return {
            "STOCKFLOW_STATE_DIR": str(s.state_dir),
            "STOCKFLOW_KAFKA_BROKERS": str(s.kafka_brokers),
            "STOCKFLOW_KAFKA_PORT": str(s.kafka_port),
            "STOCKFLOW_KAFKA_CONTROLLER_PORT": str(s.kafka_controller_port),
            "MONGODB_URI": s.mongodb_url,
            "REDIS_URL": s.redis_dsn,
        }


@contextmanager
def private_kafka(base: Settings, state_dir: Path, *, brokers: int) -> Iterator[PrivateKafka]:
    """Bring up ``brokers`` Kafka nodes of a fresh state folder on free ports (the JVM heap and
    Kafka version of ``base``); always bring them down, and raise StackError if a node
    survived or a port stayed open.

    ``base`` must name a local Kafka (the private one is started beside it, never instead).
    """
    if base.is_external("kafka"):
        raise StackError("a private Kafka is started beside the local one: unset the Kafka address")
    state_dir = state_dir.resolve()
    port = free_port_block(2 * brokers)
    settings = base.model_copy(
        update={
            "state_dir": state_dir,
            "kafka_brokers": brokers,
            "kafka_port": port,
            "kafka_controller_port": port + 1,
            "kafka_bootstrap_servers": None,
            "mongodb_uri": SecretStr(base.mongodb_url),
            "redis_url": SecretStr(base.redis_dsn),
        }
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings)
    wanted = [node.name for node in kafka_nodes(settings)]
    pids: list[int] = []
    started = time.monotonic()
    try:
        results = stack.up()
        seconds = time.monotonic() - started
        fresh = [r.name for r in results if r.action == "started"]
        if fresh != wanted:
            raise StackError(f"a private Kafka must start fresh: started {fresh}, not {wanted}")
        yield PrivateKafka(settings, seconds, list(range(port, port + 2 * brokers)))
    finally:
        pids = [p for p in (s.running_pid() for s in stack.services) if p is not None]
        down = stack.down()
    stopped = {r.name: r.action for r in down if r.name in wanted}
    if stopped != dict.fromkeys(wanted, "stopped"):
        raise StackError(f"the private Kafka did not stop cleanly: {stopped}")
    if any(is_alive(pid) for pid in pids):
        raise StackError(f"a private Kafka node outlived its stop: pids {pids}")
    still = [p for p in range(port, port + 2 * brokers) if port_open("127.0.0.1", p)]
    if still:
        raise StackError(f"ports {still} of the private Kafka are still open")
