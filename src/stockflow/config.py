"""All of stockflow's settings, typed, in one place.

Settings come from the environment (prefix ``STOCKFLOW_``), except the three service
addresses, which use the names every other tool already understands: ``KAFKA_BOOTSTRAP_SERVERS``,
``MONGODB_URI`` and ``REDIS_URL``. When one of those is set, that service is the user's own and
the local stack neither starts nor stops it. Settings are read when :func:`load_settings` is
called, never at import time.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from stockflow.errors import ConfigError

ServiceName = Literal["kafka", "mongodb", "redis"]
FerretBackend = Literal["sqlite", "postgresql"]

LOOPBACK = "127.0.0.1"
KAFKA_NODE_PORT_STEP = 2
"""Node i (from 1) of a local Kafka cluster listens on ``kafka_port + 2(i-1)`` (clients) and
``kafka_controller_port + 2(i-1)`` (controllers): 39092/39093, 39094/39095, 39096/39097."""
KAFKA_LOGGER = "stockflow.librdkafka"
"""The logger librdkafka's own lines go to (``logs.py`` decides what is shown)."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stockflow"


MASK = "***"

_SECRET_PARAM = re.compile(
    r"pass|pwd|secret|token|key|credential|signature|authmechanismproperties", re.IGNORECASE
)
"""Query parameters whose value is (or may contain) a secret: ``password=``,
``tlsCertificateKeyFilePassword=``, ``authMechanismProperties=AWS_SESSION_TOKEN:...``."""

_REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")


def _mask_query(query: str, found: list[str]) -> str:
    parts = re.split(r"([&;])", query)
    for i, part in enumerate(parts):
        name, sep, value = part.partition("=")
        if sep and _SECRET_PARAM.search(name):
            parts[i] = f"{name}={MASK}"
            found.append(value)
    return "".join(parts)


def _mask_one(url: str, found: list[str] | None = None) -> str:
    found = [] if found is None else found
    # A scheme only if it looks like one: a password may hold "://" too.
    match = re.match(r"([A-Za-z][A-Za-z0-9+.\-_]*)(://)", url)
    scheme, sep = match.groups() if match else ("", "")
    rest = url[match.end() :] if match else url
    query_at = rest.find("?")
    head = rest if query_at < 0 else rest[:query_at]
    # The userinfo ends at the last "@" before the query; a password holding a raw "?" puts
    # its "@" after that, and then everything up to the last "@" is masked.
    at = head.rfind("@")
    if at < 0:
        at = rest.rfind("@")
    if at >= 0:
        userinfo, hostpart = rest[:at], rest[at + 1 :]
        user, colon, password = userinfo.partition(":")
        if colon:
            userinfo = f"{user}:{MASK}"
            found.append(password)
        elif scheme.lower() in _REDIS_SCHEMES:
            found.append(userinfo)
            userinfo = MASK  # redis://secret@host: a lone userinfo is the password
        rest = f"{userinfo}@{hostpart}"
    path, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        rest = f"{path}?{_mask_query(query, found)}{hash_}{fragment}"
    return f"{scheme}{sep}{rest}"


def mask_url(url: str) -> str:
    """Return ``url`` with every password and secret query parameter replaced by ``***``.

    For logs, status output and errors. Handles any form (several hosts, ``mongodb+srv``,
    ``redis://:password@host``, ``?password=``, Kafka bootstrap lists, no scheme at all) by
    plain string work rather than a URL parser, and never raises. When unsure where the
    userinfo ends it masks more (up to the last ``@``), never less.
    """
    try:
        return _mask_one(str(url))
    except Exception:  # masking must never be what fails
        return MASK


def url_secrets(url: str) -> list[str]:
    """The passwords and secret query values in ``url``, as written and percent-decoded."""
    found: list[str] = []
    try:
        _mask_one(str(url), found)
    except Exception:
        return [str(url)]  # unreadable: treat the whole string as secret
    return [v for s in found for v in {s, unquote(s)} if len(v) >= 3]


class Settings(BaseSettings):
    """Every knob stockflow has. Field descriptions double as the README's settings table."""

    model_config = SettingsConfigDict(
        env_prefix="STOCKFLOW_",
        env_ignore_empty=True,
        extra="ignore",
        populate_by_name=True,
    )

    # --- where the services are (unset: the local stack started by `stockflow stack up`) ---
    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Kafka bootstrap servers of an existing cluster; unset: the local broker.",
    )
    mongodb_uri: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("MONGODB_URI", "mongodb_uri"),
        description="MongoDB connection string of an existing server; unset: the local FerretDB.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis URL of an existing server; unset: the local redis-server.",
    )

    # --- the pipeline's names (the seed's names are the defaults) ---
    topic: str = Field(default="my-order-updates2", description="Topic orders are read from.")
    group_id: str = Field(default="stockflow", description="Kafka consumer group of `consume`.")
    database: str = Field(default="ecommerce", description="MongoDB database.")
    products_collection: str = Field(default="products", description="Collection of products.")
    cache_key_prefix: str = Field(default="product_", description="Redis key prefix of products.")
    cache_ttl_seconds: int = Field(
        default=300, ge=1, description="Lifetime of a cached product, a bound on staleness."
    )
    commands_topic_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STOCKFLOW_COMMANDS_TOPIC", "commands_topic_name"),
        description="Internal topic of validated stock changes keyed by product "
        "(default `<topic>.by-product`).",
    )
    dlq_topic_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STOCKFLOW_DLQ_TOPIC", "dlq_topic_name"),
        description="Dead-letter topic (default `<topic>.dlq`).",
    )
    outcomes_topic_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STOCKFLOW_OUTCOMES_TOPIC", "outcomes_topic_name"),
        description="Topic of order outcomes (default `<topic>.outcomes`).",
    )
    commands_partitions: int = Field(
        default=6, ge=1, description="Partitions of the internal topic (fixed once created)."
    )
    orders_collection: str = Field(default="orders", description="Outcome records of orders.")
    restocks_collection: str = Field(default="restocks", description="Outcome records of restocks.")
    max_quantity: int = Field(default=10_000, ge=1, description="Largest quantity accepted.")
    max_message_bytes: int = Field(
        default=64 * 1024, ge=64, description="Largest message accepted."
    )
    batch_size: int = Field(
        default=5000,
        ge=1,
        description="Most messages a consumer handles in one transaction (it takes what has "
        "arrived, up to this many: small batches when quiet, full ones when busy).",
    )
    router_hold_ms: int = Field(
        default=50,
        ge=0,
        description="In a worker running both stages, how long the router may keep adding "
        "orders to its batch while the applier beside it is busy (commands routed sooner "
        "would only wait for it; fewer, fuller transactions leave the broker more CPU). "
        "0: commit at once.",
    )
    transaction_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="Kafka transaction timeout: how long a crashed consumer's open "
        "transaction can hold readers back.",
    )
    session_timeout_ms: int = Field(
        default=10_000,
        ge=6000,
        le=300_000,
        description="Kafka consumer-group session timeout of both stages: a worker that sends "
        "no heartbeat for this long (crashed, frozen, cut off) loses its partitions to the "
        "others. Shorter: faster failover; longer: a pause (GC, a suspended VM) is survived "
        "without a rebalance. The broker's group.min.session.timeout.ms (6 s by default) is "
        "the floor.",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        description="Attempts at a message failing for a non-transient reason before it is "
        "dead-lettered.",
    )

    # --- client tuning ---
    kafka_timeout_seconds: float = Field(
        default=30.0, gt=0, description="How long Kafka calls (delivery, admin) may take."
    )
    mongodb_timeout_ms: int = Field(
        default=5000, ge=100, description="Server selection timeout of the MongoDB client."
    )
    mongodb_socket_timeout_ms: int = Field(
        default=30_000,
        ge=100,
        description="Deadline of every reply from MongoDB (the client's `socketTimeoutMS`): a "
        "call to a hung server, or to a FerretDB whose storage hangs, fails after this long "
        "and is retried as an outage instead of blocking the worker.",
    )
    mongodb_operation_timeout_ms: int = Field(
        default=0,
        ge=0,
        description="Overall deadline of each MongoDB call, retries included (the client's "
        "`timeoutMS`, also sent as `maxTimeMS`, which FerretDB honours). 0: off. When set, "
        "pymongo waits this long, not the server selection timeout, for an absent server.",
    )
    mongodb_connect_timeout_ms: int = Field(
        default=5000, ge=100, description="How long opening a MongoDB connection may take."
    )
    mongodb_concurrency: int = Field(
        default=8,
        ge=1,
        le=8,
        description="MongoDB commands a worker sends side by side (product writes, lookups).",
    )
    redis_timeout_seconds: float = Field(
        default=1.0, gt=0, description="Socket timeout of Redis calls; a slow cache is a miss."
    )
    handler_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Longest a stage's batch may go without progress (a finished MongoDB "
        "step); past it the worker exits (status 75) and the batch is redone by a fresh one.",
    )
    stop_grace_seconds: float = Field(
        default=10.0,
        gt=0,
        description="After SIGTERM/SIGINT, how long the batch in hand may go without progress "
        "before the worker exits (status 75) without committing it.",
    )

    # --- what the command line shows (the global -v and --timestamps; children inherit) ---
    verbose: bool = Field(
        default=False, description="Debug logging, librdkafka's own lines included (`-v`)."
    )
    log_timestamps: bool = Field(
        default=False, description="Prefix log lines with the time (`--timestamps`)."
    )

    # --- the local stack ---
    state_dir: Path = Field(
        default=Path(".stack"), description="Running state of the local stack: data, pids, logs."
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Downloads and builds, shared by every clone on this machine.",
    )
    kafka_version: str = Field(default="4.3.1", description="Apache Kafka version to run.")
    kafka_port: int = Field(default=39092, description="Local broker's client port.")
    kafka_controller_port: int = Field(default=39093, description="Local KRaft controller port.")
    kafka_heap: str = Field(default="512m", description="JVM heap (-Xmx) of each local Kafka node.")
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=9,
        description="Nodes of the local Kafka (`stack up --brokers N`): 1, or a KRaft cluster "
        "of combined broker+controller nodes, node i on the Kafka and controller ports + "
        f"{KAFKA_NODE_PORT_STEP}(i-1), topics at replication min(3, N).",
    )
    ferretdb_version: str = Field(default="v1.24.2", description="FerretDB version to build.")
    ferretdb_backend: FerretBackend = Field(
        default="postgresql",
        description="FerretDB storage: postgresql (a private local cluster) or sqlite.",
    )
    ferretdb_port: int = Field(default=37017, description="Local FerretDB port.")
    ferretdb_pool_max_conns: int = Field(
        default=180,
        ge=2,
        le=190,
        description="PostgreSQL connections the local FerretDB may hold (its pool_max_conns; "
        "the local PostgreSQL allows 200). At least 2: FerretDB's first metadata load needs two.",
    )
    postgres_port: int = Field(
        default=35432, description="Local PostgreSQL port (postgresql backend only)."
    )
    postgres_synchronous_commit: Literal["on", "off"] = Field(
        default="off",
        description=(
            "Local PostgreSQL's synchronous_commit. off (the default) flushes its log every "
            "100 ms, as a standalone mongod flushes its journal: a crash of PostgreSQL itself "
            "(or of the machine) can lose the last ~100 ms of acknowledged writes. on waits "
            "for the disk at every write, several times slower on small batches."
        ),
    )
    redis_port: int = Field(default=36379, description="Local redis-server port.")
    stack_start_timeout_seconds: float = Field(
        default=120.0, gt=0, description="How long `stack up` waits for a service to answer."
    )

    @field_validator("state_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # --- derived names ---
    @property
    def commands_topic(self) -> str:
        return self.commands_topic_name or f"{self.topic}.by-product"

    @property
    def dlq_topic(self) -> str:
        return self.dlq_topic_name or f"{self.topic}.dlq"

    @property
    def outcomes_topic(self) -> str:
        return self.outcomes_topic_name or f"{self.topic}.outcomes"

    @property
    def router_group_id(self) -> str:
        return f"{self.group_id}-router"

    # --- derived addresses ---
    def is_external(self, service: ServiceName) -> bool:
        """True when the user named this service's address, so stockflow must not manage it."""
        return {
            "kafka": self.kafka_bootstrap_servers,
            "mongodb": self.mongodb_uri,
            "redis": self.redis_url,
        }[service] is not None

    def kafka_node_ports(self) -> list[tuple[int, int]]:
        """The (client, controller) ports of each node of the local Kafka, node 1 first."""
        step = KAFKA_NODE_PORT_STEP
        return [
            (self.kafka_port + step * i, self.kafka_controller_port + step * i)
            for i in range(self.kafka_brokers)
        ]

    @model_validator(mode="after")
    def _kafka_ports_distinct(self) -> Settings:
        ports = [port for pair in self.kafka_node_ports() for port in pair]
        if len(set(ports)) != len(ports):
            raise ValueError(
                f"the {self.kafka_brokers} Kafka node(s) need distinct ports, got {ports}: "
                f"node i uses STOCKFLOW_KAFKA_PORT and STOCKFLOW_KAFKA_CONTROLLER_PORT "
                f"+ {KAFKA_NODE_PORT_STEP}(i-1)"
            )
        return self

    @property
    def kafka_bootstrap(self) -> str:
        """The user's bootstrap servers, else every node of the local Kafka."""
        if self.kafka_bootstrap_servers:
            return self.kafka_bootstrap_servers
        return ",".join(f"{LOOPBACK}:{port}" for port, _ in self.kafka_node_ports())

    @property
    def mongodb_url(self) -> str:
        if self.mongodb_uri is not None:
            return self.mongodb_uri.get_secret_value()
        return f"mongodb://{LOOPBACK}:{self.ferretdb_port}/"

    @property
    def redis_dsn(self) -> str:
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    def worker_environment(self) -> dict[str, str]:
        """The environment that makes a ``stockflow`` child process work on the same pipeline
        (topics, database, group, cache prefix, partitions, batch size) as these settings."""
        return {
            "STOCKFLOW_TOPIC": self.topic,
            "STOCKFLOW_COMMANDS_TOPIC": self.commands_topic,
            "STOCKFLOW_DLQ_TOPIC": self.dlq_topic,
            "STOCKFLOW_OUTCOMES_TOPIC": self.outcomes_topic,
            "STOCKFLOW_DATABASE": self.database,
            "STOCKFLOW_CACHE_KEY_PREFIX": self.cache_key_prefix,
            "STOCKFLOW_GROUP_ID": self.group_id,
            "STOCKFLOW_COMMANDS_PARTITIONS": str(self.commands_partitions),
            "STOCKFLOW_BATCH_SIZE": str(self.batch_size),
            "STOCKFLOW_VERBOSE": str(self.verbose).lower(),
            "STOCKFLOW_LOG_TIMESTAMPS": str(self.log_timestamps).lower(),
        }

    def kafka_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka configuration shared by every client, with ``extra`` on top.

        librdkafka's own log lines go to Python logging (``stockflow.librdkafka``, see
        ``logs.py``) instead of straight to stderr.
        """
        return {
            "bootstrap.servers": self.kafka_bootstrap,
            "client.id": "stockflow",
            "logger": logging.getLogger(KAFKA_LOGGER),
            **extra,
        }

    def secrets(self) -> list[str]:
        """Every password in the three service addresses, to keep out of what is shown."""
        return [
            secret
            for url in (self.kafka_bootstrap, self.mongodb_url, self.redis_dsn)
            for secret in url_secrets(url)
        ]

    def addresses(self) -> dict[ServiceName, str]:
        """The three service addresses, passwords masked, for humans."""
        return {
            "kafka": mask_url(self.kafka_bootstrap),
            "mongodb": mask_url(self.mongodb_url),
            "redis": mask_url(self.redis_dsn),
        }


def _variable(field: str) -> str:
    """The environment variable that sets ``field``."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"STOCKFLOW_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment now; ``overrides`` win over the environment.

    ConfigError (one line naming each variable, what is wrong and the value given) if any
    setting is unusable.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [
            (
                f"{_variable(str(error['loc'][0]))}: {error['msg']}"
                + (
                    f" (got {error['input']!r})"
                    if isinstance(error.get("input"), str | int)
                    else ""
                )
                if error["loc"]
                else str(error["msg"]).removeprefix("Value error, ")  # a check across fields
            )
            for error in exc.errors()
        ]
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
