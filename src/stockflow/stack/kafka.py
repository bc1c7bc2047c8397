"""Apache Kafka in KRaft mode, from Maven Central's jars, run with the machine's JDK.

Provisioning resolves ``kafka_2.13`` and ``kafka-tools`` with Maven's ``copy-dependencies``
into ``<cache>/kafka-<version>/libs`` (once per machine). Each start needs a formatted log
directory: the first start formats it as a one-node (``--standalone``) controller quorum.

With ``kafka_brokers`` N > 1 the local Kafka is a cluster of N combined broker+controller
nodes (:class:`KafkaNode`), each with its own ports and folder (``kafka-1`` .. ``kafka-N``),
voting in one static controller quorum (``controller.quorum.voters``) and formatted with one
shared cluster id; the internal topics are replicated min(3, N) times. One node (the default)
keeps the folder ``kafka`` and the ports of the settings.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from stockflow.config import LOOPBACK, Settings
from stockflow.errors import ProvisionError
from stockflow.stack import process
from stockflow.stack.service import Reporter, Service, require_tool

LOG4J_VERSION = "2.25.4"
"""The log4j2 release Kafka 4.3.1 is built against; its SLF4J binding is added to the POM."""
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def kraft_cluster_id() -> str:
    """A random cluster id in Kafka's own format (a UUID, URL-safe base64, no padding).

    Like Kafka's ``Uuid.randomUuid()``, never one that starts with ``-``: the storage tool's
    argument parser takes such an id for an option (1 start in 64 failed that way).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def replication_for(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of topics on a cluster of ``brokers``:
    three copies at most, and writes acknowledged by two of three, so one node may be down."""
    replicas = max(1, min(3, brokers))
    return replicas, 2 if replicas >= 3 else 1


@dataclass(frozen=True)
class KafkaNode:
    """One combined broker+controller node of the local Kafka: its id, ports, folder and the
    controller quorum it votes in (``voters``: (node id, controller port) of every voter)."""

    node_id: int
    port: int
    controller_port: int
    dir: Path
    voters: tuple[tuple[int, int], ...] = ()
    """Empty for a lone node, whose quorum is itself (formatted ``--standalone``)."""

    @property
    def name(self) -> str:
        return f"kafka-{self.node_id}" if self.voters else "kafka"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def server_properties(self) -> str:
        """The node's ``server.properties`` (pure: from the node's fields alone)."""
        controller = f"{LOOPBACK}:{self.controller_port}"
        plaintext = f"{LOOPBACK}:{self.port}"
        replicas, min_isr = replication_for(len(self.voters) or 1)
        quorum = (
            {
                "controller.quorum.voters": ",".join(
                    f"{voter}@{LOOPBACK}:{port}" for voter, port in self.voters
                )
            }
            if self.voters
            else {"controller.quorum.bootstrap.servers": controller}
        )
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": f"PLAINTEXT://{plaintext},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{plaintext},CONTROLLER://{controller}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min_isr),
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": str(replicas),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            "group.initial.rebalance.delay.ms": "0",
            # A crashed worker's open transaction holds its partitions' readers back until the
            # broker aborts it: at the transaction timeout, but only on its next sweep for expired
            # transactions (every 10 s by default), so a kill -9 stalled the applier up to 25 s.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "168",
        }
        if self.voters:
            # Topics created without a replication factor (by other tools) are replicated too.
            props["default.replication.factor"] = str(replicas)
        return "".join(f"{key}={value}\n" for key, value in props.items())


def kafka_nodes(settings: Settings) -> list[KafkaNode]:
    """The nodes of the local Kafka the settings describe (``kafka_brokers`` of them)."""
    ports = settings.kafka_node_ports()
    if len(ports) == 1:
        port, controller = ports[0]
        return [KafkaNode(1, port, controller, settings.state_dir / "kafka")]
    voters = tuple((i, controller) for i, (_, controller) in enumerate(ports, start=1))
    return [
        KafkaNode(i, port, controller, settings.state_dir / f"kafka-{i}", voters)
        for i, (port, controller) in enumerate(ports, start=1)
    ]


def quorum_leader(nodes: list[KafkaNode]) -> tuple[int, int] | None:
    """(leader id, epoch) of the controller quorum, as the nodes last recorded it.

    Every KRaft node keeps its view in ``__cluster_metadata-0/quorum-state``; the newest epoch
    wins. None when no node has seen a leader yet.
    """
    best: tuple[int, int] | None = None
    for node in nodes:
        try:
            state = json.loads(
                (node.data_dir / "__cluster_metadata-0" / "quorum-state").read_text()
            )
            leader, epoch = int(state["leaderId"]), int(state["leaderEpoch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if leader >= 0 and (best is None or epoch > best[1]):
            best = (leader, epoch)
    return best


def _asset(name: str) -> str:
    return resources.files("stockflow.stack").joinpath("assets", "kafka", name).read_text()


class KafkaService(Service):
    """One node of the local Kafka on loopback (by default the only one)."""

    name = "kafka"
    external_kind = "kafka"

    def __init__(self, settings: Settings, node: KafkaNode | None = None) -> None:
        self.node = node or kafka_nodes(settings)[0]
        self.name = self.node.name
        super().__init__(settings)

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def port_variable(self) -> str:
        if not self.node.voters:
            return "STOCKFLOW_KAFKA_PORT"
        offset = self.port - self.settings.kafka_port
        return f"STOCKFLOW_KAFKA_PORT; node {self.node.node_id} uses it + {offset}"

    @property
    def address(self) -> str:
        if self.external or not self.node.voters:
            return self.settings.addresses()["kafka"]
        return f"{LOOPBACK}:{self.node.port}"

    @property
    def libs(self) -> Path:
        return self.settings.cache_dir / f"kafka-{self.settings.kafka_version}" / "libs"

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    def log_paths(self) -> tuple[Path, ...]:
        return (self.logfile, self.dir / "logs" / "server.log")

    # --- provisioning ---
    def provision(self, report: Reporter) -> None:
        require_tool("java", "install a JDK 17 or newer (Debian: openjdk-17-jre-headless)")
        if (self.libs / ".complete").exists():
            return
        mvn = require_tool("mvn", "install Apache Maven (Debian: maven)")
        version = self.settings.kafka_version
        report(f"kafka: resolving Apache Kafka {version} jars from Maven Central (first run only)")
        pom = _asset("pom.xml").replace("@KAFKA_VERSION@", version)
        pom = pom.replace("@LOG4J_VERSION@", LOG4J_VERSION)
        self.libs.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.libs.parent, prefix="build-") as tmp:
            work = Path(tmp)
            (work / "pom.xml").write_text(pom)
            out = work / "libs"
            cmd = [
                mvn,
                "-B",
                "-q",
                f"-Dmaven.repo.local={self.settings.cache_dir / 'm2'}",
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={out}",
            ]
            result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
            jar = out / f"kafka_2.13-{version}.jar"
            if result.returncode != 0 or not jar.exists():
                raise ProvisionError(
                    f"kafka: Maven could not resolve Apache Kafka {version}:\n"
                    f"{(result.stdout + result.stderr)[-3000:]}"
                )
            (out / ".complete").write_text(version)
            if self.libs.exists():
                shutil.rmtree(self.libs)
            out.rename(self.libs)

    # --- configuration and storage ---
    def server_properties(self) -> str:
        return self.node.server_properties()

    def cluster_id(self) -> str:
        """The id every node of a cluster is formatted with: made once, kept in the state
        folder (a lone node gets a fresh one, as before)."""
        if not self.node.voters:
            return kraft_cluster_id()
        path = self.settings.state_dir / "kafka-cluster.id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            cluster_id = kraft_cluster_id()
            path.write_text(cluster_id + "\n")
            return cluster_id

    def prepare(self, report: Reporter) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        config = self.dir / "server.properties"
        config.write_text(self.server_properties())
        (self.dir / "log4j2.properties").write_text(_asset("log4j2.properties"))
        (self.dir / "log4j.properties").write_text(_asset("log4j.properties"))  # Kafka < 4
        if (self.data_dir / "meta.properties").exists():
            return
        report(f"{self.name}: formatting KRaft storage (first start only)")
        cmd = [
            *self._java(),
            STORAGE_TOOL,
            "format",
            "--cluster-id",
            self.cluster_id(),
            "--config",
            str(config),
            # A cluster's quorum is the static voter list of server.properties.
            *([] if self.node.voters else ["--standalone"]),
            "--ignore-formatted",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=self._env())
        if result.returncode != 0:
            raise ProvisionError(
                f"{self.name}: formatting storage failed:\n{result.stderr[-3000:]}"
            )

    def _java(self) -> list[str]:
        heap = self.settings.kafka_heap
        return [
            require_tool("java", "install a JDK 17 or newer"),
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            # Kafka 3.x logs through log4j 1 (reload4j), which reads this one instead.
            f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}",
            f"-Dkafka.logs.dir={self.dir / 'logs'}",
            "-cp",
            f"{self.libs}/*",
        ]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C"}

    def argv(self) -> list[str]:
        return [*self._java(), MAIN_CLASS, str(self.dir / "server.properties")]

    # --- health ---
    def probe(self) -> str | None:
        if self.node.voters and not self.external:
            return self._probe_node()
        host, _, port = self.address.split(",")[0].rpartition(":")
        if not self.external and not process.port_open(host or "127.0.0.1", int(port)):
            return None
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            self.settings.kafka_config(**{"log_level": 0, "socket.timeout.ms": 2000})
        )
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception:
            return None
        brokers = len(metadata.brokers)
        version = self._broker_version() if not self.external else "version not reported"
        plural = "s" if brokers != 1 else ""
        cluster = metadata.cluster_id
        return f"Apache Kafka {version} (KRaft, {brokers} broker{plural}, cluster {cluster})"

    def _probe_node(self) -> str | None:
        """A cluster node answers when it is itself among the brokers it reports (registered
        with the controller quorum and unfenced)."""
        if not process.port_open(LOOPBACK, self.node.port):
            return None
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            self.settings.kafka_config(
                **{
                    "bootstrap.servers": f"{LOOPBACK}:{self.node.port}",
                    "log_level": 0,
                    "socket.timeout.ms": 2000,
                }
            )
        )
        try:
            metadata = admin.list_topics(timeout=3)
        except Exception:
            return None
        if self.node.node_id not in metadata.brokers:
            return None
        leader = quorum_leader(kafka_nodes(self.settings))
        quorum = f"quorum leader node {leader[0]}, epoch {leader[1]}" if leader else "no leader"
        return (
            f"Apache Kafka {self._broker_version()} (KRaft, node {self.node.node_id}, "
            f"{len(metadata.brokers)} of {len(self.node.voters)} brokers up, "
            f"cluster {metadata.cluster_id}, {quorum})"
        )

    def _broker_version(self) -> str:
        """The version the running broker logged at start (its jars' version as a fallback).

        The log rolls (``server.log``, then ``server.log.1`` .. ``.3``, newest first), so the
        start-up line may have moved into an older file.
        """
        logs = self.dir / "logs"
        for path in [logs / "server.log", *(logs / f"server.log.{i}" for i in range(1, 4))]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            found = re.findall(r"Kafka version: (\S+)", text)
            if found:
                return str(found[-1])
        return self.settings.kafka_version


def kafka_services(settings: Settings) -> list[KafkaService]:
    """A service per node of the local Kafka (one, whose address is the user's, if external)."""
    if settings.is_external("kafka"):
        return [KafkaService(settings)]
    return [KafkaService(settings, node) for node in kafka_nodes(settings)]


def other_kafka_nodes(settings: Settings) -> list[KafkaService]:
    """Running nodes of this state folder that the settings do not describe: a cluster left
    up by ``stack up --brokers N`` when the settings say one node, or the other way round."""
    if settings.is_external("kafka"):
        return []
    state = settings.state_dir
    clustered = [f for f in state.glob("kafka-*") if f.name[6:].isdigit() and f.is_dir()]
    layouts = [1, len(clustered)] if len(clustered) > 1 else [1]
    wanted = {node.dir for node in kafka_nodes(settings)}
    found: list[KafkaService] = []
    for size in layouts:
        layout = settings.model_copy(update={"kafka_brokers": size})
        for node in kafka_nodes(layout):
            if node.dir in wanted:
                continue
            service = KafkaService(layout, node)
            if service.running_pid() is not None:
                found.append(service)
    return found
