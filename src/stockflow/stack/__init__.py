"""The local stack: Kafka, a MongoDB-compatible server and Redis, started by the project itself.

``Stack.up()`` provisions (cached per machine), starts and waits for each service that the
user has not pointed elsewhere; ``down()`` stops only what ``up()`` started.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass

from stockflow.config import ServiceName, Settings
from stockflow.errors import StackError
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.kafka import KafkaService, kafka_services, other_kafka_nodes
from stockflow.stack.postgres import PostgresService
from stockflow.stack.process import file_lock
from stockflow.stack.redis import RedisService
from stockflow.stack.service import Reporter, Service, ServiceStatus

__all__ = ["ServiceResult", "ServiceStatus", "Stack", "take_back_own"]

_ADDRESS_FIELDS: dict[ServiceName, str] = {
    "kafka": "kafka_bootstrap_servers",
    "mongodb": "mongodb_uri",
    "redis": "redis_url",
}
_VARIABLES: dict[ServiceName, str] = {
    "kafka": "KAFKA_BOOTSTRAP_SERVERS",
    "mongodb": "MONGODB_URI",
    "redis": "REDIS_URL",
}


@dataclass(frozen=True)
class ServiceResult:
    """What ``up`` or ``down`` did to one service."""

    name: str
    action: str
    pid: int | None = None
    version: str | None = None


def _quiet(_: str) -> None:
    pass


class Stack:
    """The three services, in start order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: list[Service] = [RedisService(settings)]
        if settings.ferretdb_backend == "postgresql" and not settings.is_external("mongodb"):
            self.services.append(PostgresService(settings))
        self.services += [FerretDBService(settings), *kafka_services(settings)]

    def _lock(self) -> AbstractContextManager[None]:
        return file_lock(self.settings.state_dir / "stack.lock")

    def up(self, report: Reporter = _quiet) -> list[ServiceResult]:
        """Start every local service that is not running and wait until all answer.

        Provisioning (downloads, builds) runs in parallel; so do the waits, since the broker's
        start-up dominates.
        """
        with self._lock():
            if not self.settings.is_external("kafka"):
                others = other_kafka_nodes(self.settings)
                if others:
                    raise StackError(
                        f"{others[0].name} of another Kafka layout runs from "
                        f"{self.settings.state_dir} (pid {others[0].running_pid()}): run "
                        "`stockflow stack down` before changing the number of brokers"
                    )
            with ThreadPoolExecutor(len(self.services)) as pool:
                for future in [
                    pool.submit(s.provision, report) for s in self.services if not s.external
                ]:
                    future.result()
            started = []
            for service in self.services:
                action, pid = service.start(report)
                if service.dependency:
                    service.wait_ready(pid)
                started.append((service, action, pid))
            for service, action, _ in started:
                if action.startswith(("started", "restarted")) and not service.dependency:
                    report(f"{service.name}: waiting until it answers")
            with ThreadPoolExecutor(len(self.services)) as pool:
                versions = [pool.submit(s.wait_ready, pid) for s, _, pid in started]
                return [
                    ServiceResult(s.name, action, pid, v.result())
                    for (s, action, pid), v in zip(started, versions, strict=True)
                ]

    def down(self) -> list[ServiceResult]:
        """Stop what ``up`` started, the broker first so clients see a clean close.

        A cluster's nodes are stopped together: stopped one by one, the last would wait for
        a controller quorum that has gone and be killed after the grace time.
        """
        with self._lock():
            # Nodes of another broker count (`stack up --brokers 3`, then `stack down`) too.
            services = [*self.services, *other_kafka_nodes(self.settings)]
            kafka = [s for s in reversed(services) if isinstance(s, KafkaService)]
            with ThreadPoolExecutor(len(kafka) or 1) as pool:
                stopped = dict(zip(kafka, pool.map(lambda s: s.stop(), kafka), strict=True))
            return [
                ServiceResult(s.name, stopped[s] if s in stopped else s.stop())
                for s in reversed(services)
            ]

    def status(self) -> list[ServiceStatus]:
        services = [*self.services, *other_kafka_nodes(self.settings)]
        with ThreadPoolExecutor(len(services)) as pool:
            return list(pool.map(lambda s: s.status(), services))

    def env_lines(self) -> list[str]:
        """``export`` lines that point other tools at the same three services."""
        s = self.settings
        values = {
            "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap,
            "MONGODB_URI": s.mongodb_url,
            "REDIS_URL": s.redis_dsn,
        }
        return [f"export {key}={shlex.quote(value)}" for key, value in values.items()]


def take_back_own(settings: Settings) -> tuple[Settings, list[str]]:
    """Treat as local every service address that names this state folder's own running service.

    ``eval "$(stockflow stack env)"`` exports the local stack's addresses, which then look like
    the user's own services. An address is taken back when it is exactly the one ``stack env``
    prints for these settings and the state folder's pid file names a live process of that
    service. Returns the settings with those addresses unset, and one line per address that
    remains the user's own, saying why.
    """
    local = settings.model_copy(update=dict.fromkeys(_ADDRESS_FIELDS.values()))
    owners: dict[ServiceName, Service] = {
        "kafka": kafka_services(local)[0],
        "mongodb": FerretDBService(local),
        "redis": RedisService(local),
    }
    own: dict[ServiceName, str] = {
        "kafka": local.kafka_bootstrap,
        "mongodb": local.mongodb_url,
        "redis": local.redis_dsn,
    }
    given: dict[ServiceName, str] = {
        "kafka": settings.kafka_bootstrap,
        "mongodb": settings.mongodb_url,
        "redis": settings.redis_dsn,
    }
    taken: dict[str, None] = {}
    foreign = []
    for kind, field in _ADDRESS_FIELDS.items():
        if not settings.is_external(kind):
            continue
        shown = f"{_VARIABLES[kind]}={settings.addresses()[kind]}"
        service = owners[kind]
        if given[kind] != own[kind]:
            foreign.append(
                f"{shown} is not this local stack's address ({own[kind]}, state folder "
                f"{settings.state_dir})"
            )
        elif service.running_pid() is None:
            foreign.append(
                f"{shown} is this local stack's address, but its {service.name} is not "
                f"running from {settings.state_dir} (no live pid file)"
            )
        else:
            taken[field] = None
    return settings.model_copy(update=taken), foreign
