"""Every librdkafka configuration stockflow uses, one function per role, built from Settings.

``Settings.kafka_config()`` is the base every client shares (bootstrap servers, client id,
the logger that takes librdkafka's own lines);
each role adds what it needs and says why. Callers pass ``overrides`` last, so a test or a
benchmark can change one knob without copying the rest.
"""

from __future__ import annotations

import uuid
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from stockflow.config import Settings

Config = dict[str, Any]
"""A librdkafka configuration."""

AUTH_ERRORS = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.DELEGATION_TOKEN_AUTHORIZATION_FAILED,
    }
)
"""librdkafka's errors that say the broker refuses stockflow's credentials or ACLs: a
configuration error (exit 78), never an outage to wait out."""


def auth_error(error: object) -> str | None:
    """The name of the refusal when ``error`` (a KafkaError, or a KafkaException carrying one)
    says the broker refuses stockflow's credentials or permissions; else None."""
    if isinstance(error, KafkaException) and error.args:
        error = error.args[0]
    if isinstance(error, KafkaError) and error.code() in AUTH_ERRORS:
        return error.name()
    return None


def loop_consumer(settings: Settings, *, group_id: str, client_id: str, **overrides: Any) -> Config:
    """A consumer-group member of a transactional stage (``consumer.TransactionalLoop``)."""
    return settings.kafka_config(
        **{
            "group.id": group_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": 1_000,
            "max.poll.interval.ms": 300_000,
            "fetch.wait.max.ms": 100,
            # Bound the pre-fetch so that memory stays flat however long the backlog:
            # keep two batches ready, and fetch in small steps. The fetch limits count
            # bytes on the wire: one compressed 1 MB partition fetch of small JSON orders
            # unpacks into ~100,000 queued messages (~50 MB), which is how a 200,000-order
            # backlog once cost 70 MB more than a 50,000 one.
            "queued.min.messages": max(1000, 2 * settings.batch_size),
            "queued.max.messages.kbytes": 2048,
            "max.partition.fetch.bytes": 128 * 1024,
            "fetch.max.bytes": 1024 * 1024,
            # Once those two batches are queued, librdkafka postpones the partition's next
            # fetch by this much (default 1 s), which starved small batches: at 500 per
            # batch the applier idled half the time (2,000 instead of 4,000 orders/s).
            "fetch.queue.backoff.ms": 10,
            **overrides,
        }
    )


def transactional_producer(settings: Settings, *, client_id: str, **overrides: Any) -> Config:
    """The producer of a transactional stage: outputs and input offsets in one transaction.

    The transactional id is unique to the loop (a restarted worker is a new producer; the
    transaction timeout bounds how long a crashed one's open transaction holds readers back).
    """
    return settings.kafka_config(
        **{
            "client.id": client_id,
            "transactional.id": f"{client_id}-{uuid.uuid4().hex}",
            "transaction.timeout.ms": settings.transaction_timeout_ms,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # The coordinator finishes a commit in the background; the next transaction's
            # first requests are refused until it has (CONCURRENT_TRANSACTIONS). Retry
            # those quickly: the default backoff (100 ms, growing) doubles the latency.
            "retry.backoff.ms": 5,
            "retry.backoff.max.ms": 100,
            # Commands and outcomes are small and read back at once; compressing them
            # saves no I/O worth having and multiplies what a consumer's fetch unpacks.
            "compression.type": "none",
            **overrides,
        }
    )


def order_producer(settings: Settings, **overrides: Any) -> Config:
    """The idempotent producer of orders, restocks and replayed dead letters."""
    return settings.kafka_config(
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.timeout.ms": int(settings.kafka_timeout_seconds * 1000),
            **overrides,
        }
    )


def admin(settings: Settings, **overrides: Any) -> Config:
    """Topic administration."""
    return settings.kafka_config(**overrides)


def offsets_probe(settings: Settings, *, group_id: str, **overrides: Any) -> Config:
    """A consumer that never subscribes: it reads watermarks or a group's committed offsets."""
    return settings.kafka_config(**{"group.id": group_id, **overrides})
