"""Helpers for runs beside the local stack (tests, chaos runs, benchmarks): free ports, a
private Kafka -- one broker or a KRaft cluster -- and a private MongoDB-wire server (FerretDB
over a PostgreSQL of its own), each sharing nothing with the local stack, and a way to hang a
server's whole process tree.

A private Kafka has its own state folder and ports; MongoDB and Redis stay those of the
settings it is started from, which the run uses under its own names. Child processes (workers)
find it through :meth:`PrivateKafka.environment`. A private database is the other way round:
its own MongoDB server, for a run that stops, hangs or deadlocks it, or compares FerretDB
builds (:class:`PrivateDatabase`).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from stockflow.config import Settings
from stockflow.errors import StackError
from stockflow.stack import Stack
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.ferretdb_patches import BUILD, Build
from stockflow.stack.kafka import KafkaService, kafka_nodes
from stockflow.stack.postgres import PostgresService
from stockflow.stack.process import is_alive, port_open, process_tree


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the system reports free now. Better than fixed ones, which may be
    taken by a client connection's local port (they lie in the ephemeral range)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def hung(pid: int) -> Iterator[list[int]]:
    """``pid`` and every process below it stopped (SIGSTOP) for the block: connections stay
    open and nothing answers (PostgreSQL's backends lead process groups of their own, so a
    group signal would miss them). Continued in reverse order afterwards, whatever happens;
    yields the stopped pids."""
    tree = process_tree(pid)
    stopped: list[int] = []
    try:
        for member in tree:
            with suppress(ProcessLookupError):
                os.kill(member, signal.SIGSTOP)
                stopped.append(member)
        yield stopped
    finally:
        for member in reversed(stopped):
            with suppress(ProcessLookupError):
                os.kill(member, signal.SIGCONT)


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


class PrivateDatabase:
    """FerretDB of ``build`` over a PostgreSQL of its own, on free ports, in ``state_dir``: a
    MongoDB-wire server that a run may stop, hang or deadlock without touching the local stack.

    ``settings`` (extra fields of :class:`Settings`: a pool size, a database name, client
    deadlines) go into :attr:`settings`, whose ``mongodb_url`` is this server. Start it with
    :meth:`up` (or one service at a time); :meth:`down` always leaves nothing behind.
    """

    def __init__(self, state_dir: Path, build: Build = BUILD, **settings: Any) -> None:
        ferretdb_port, postgres_port = free_ports(2)
        self.settings = Settings(
            state_dir=state_dir,
            mongodb_uri=None,  # one in the environment would make FerretDB "external"
            ferretdb_backend="postgresql",
            ferretdb_port=ferretdb_port,
            postgres_port=postgres_port,
            **settings,
        )
        self.postgres = PostgresService(self.settings)
        self.ferretdb = FerretDBService(self.settings, build)

    @property
    def url(self) -> str:
        return self.settings.mongodb_url

    def start_postgres(self) -> int:
        _, pid = self.postgres.start(lambda _: None)
        self.postgres.wait_ready(pid)
        assert pid is not None
        return pid

    def start_ferretdb(self, build: Build | None = None) -> int:
        """Start FerretDB: of ``build`` from now on when one is given (none may be running)."""
        if build is not None:
            self.ferretdb = FerretDBService(self.settings, build)
        _, pid = self.ferretdb.start(lambda _: None)
        self.ferretdb.wait_ready(pid)
        assert pid is not None
        return pid

    def up(self) -> None:
        self.start_postgres()
        self.start_ferretdb()

    def hang_postgres(self) -> AbstractContextManager[list[int]]:
        """PostgreSQL and all its backends stopped for a ``with`` block (:func:`hung`)."""
        pid = self.postgres.running_pid()
        if pid is None:
            raise StackError("the private PostgreSQL is not running")
        return hung(pid)

    def kill_ferretdb(self) -> None:
        """SIGKILL FerretDB's process group: a deadlocked FerretDB never ends a graceful stop."""
        pid = self.ferretdb.running_pid()
        if pid is not None:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.ferretdb.stop()

    def down(self) -> None:
        """Stop both servers and delete the PostgreSQL cluster, wherever its data went."""
        self.ferretdb.stop()
        self.postgres.stop()
        self.postgres.remove_data()


@contextmanager
def private_database(
    state_dir: Path, build: Build = BUILD, **settings: Any
) -> Iterator[PrivateDatabase]:
    """A :class:`PrivateDatabase` up for the block, down afterwards."""
    database = PrivateDatabase(state_dir, build, **settings)
    try:
        database.up()
        yield database
    finally:
        database.down()
