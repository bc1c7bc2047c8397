"""Apache Kafka in KRaft mode, from Maven Central's jars, run with the machine's JDK.

Provisioning resolves ``kafka_2.13`` and ``kafka-tools`` with Maven's ``copy-dependencies``
into ``<cache>/kafka-<version>/libs`` (once per machine). Each start needs a formatted log
directory: the first start formats it as a one-node (``--standalone``) controller quorum.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from importlib import resources
from pathlib import Path

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


def _asset(name: str) -> str:
    return resources.files("stockflow.stack").joinpath("assets", "kafka", name).read_text()


class KafkaService(Service):
    """A single combined broker+controller node on loopback."""

    name = "kafka"
    external_kind = "kafka"

    @property
    def port(self) -> int:
        return self.settings.kafka_port

    @property
    def address(self) -> str:
        return self.settings.addresses()["kafka"]

    @property
    def libs(self) -> Path:
        return self.settings.cache_dir / f"kafka-{self.settings.kafka_version}" / "libs"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

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
        s = self.settings
        controller = f"127.0.0.1:{s.kafka_controller_port}"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": controller,
            "listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://{controller}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "168",
        }
        return "".join(f"{key}={value}\n" for key, value in props.items())

    def prepare(self, report: Reporter) -> None:
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        config = self.dir / "server.properties"
        config.write_text(self.server_properties())
        (self.dir / "log4j2.properties").write_text(_asset("log4j2.properties"))
        (self.dir / "log4j.properties").write_text(_asset("log4j.properties"))  # Kafka < 4
        if (self.data_dir / "meta.properties").exists():
            return
        report("kafka: formatting KRaft storage (first start only)")
        cmd = [
            *self._java(),
            STORAGE_TOOL,
            "format",
            "--cluster-id",
            kraft_cluster_id(),
            "--config",
            str(config),
            "--standalone",
            "--ignore-formatted",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=self._env())
        if result.returncode != 0:
            raise ProvisionError(f"kafka: formatting storage failed:\n{result.stderr[-3000:]}")

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
