"""Topic administration: create, list, describe (partitions, leaders, replicas, in-sync
replicas, end offsets; the topic's id), and read end offsets."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from stockflow import kafka_clients
from stockflow.config import Settings
from stockflow.errors import AccessDeniedError, KafkaUnavailableError, TopicError
from stockflow.stack.kafka import replication_for


@dataclass(frozen=True)
class TopicInfo:
    """A topic's name, partition count and replication factor."""

    name: str
    partitions: int
    replication: int


@dataclass(frozen=True)
class PartitionInfo:
    """One partition: its leader broker, replicas, in-sync replicas and end offset."""

    partition: int
    leader: int | None
    replicas: list[int]
    in_sync: list[int]
    end_offset: int


@dataclass(frozen=True)
class TopicDescription:
    """What ``stockflow topics describe`` shows."""

    name: str
    topic_id: str | None
    partitions: list[PartitionInfo]

    @property
    def messages(self) -> int:
        """The sum of the end offsets (on a transactional topic, commit markers count too)."""
        return sum(p.end_offset for p in self.partitions)


def refused(settings: Settings, exc: KafkaException) -> None:
    """Raise AccessDeniedError (exit 78) if ``exc`` says Kafka refuses stockflow's credentials
    or ACLs: that is no outage, and no topic is at fault."""
    name = kafka_clients.auth_error(exc)
    if name is not None:
        raise AccessDeniedError(
            f"Kafka at {settings.addresses()['kafka']} refused stockflow's credentials or "
            f"permissions ({name}): check KAFKA_BOOTSTRAP_SERVERS and the SASL settings, and "
            "the user's ACLs"
        ) from None


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(kafka_clients.admin(settings))


def cluster_replication(settings: Settings, admin: AdminClient | None = None) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for topics on this cluster: min(3, brokers),
    and 2 in sync when there are 3 copies, so ``acks=all`` survives one broker down."""
    try:
        metadata = (admin or admin_client(settings)).list_topics(
            timeout=settings.kafka_timeout_seconds
        )
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {settings.addresses()['kafka']}: {exc}"
        ) from None
    # A local cluster counts all its nodes, so a topic made while one restarts is still
    # replicated three times (the live brokers alone would say two).
    local = 1 if settings.is_external("kafka") else settings.kafka_brokers
    return replication_for(max(len(metadata.brokers), local))


def create_topic(
    settings: Settings, name: str, *, partitions: int = 1, replication: int | None = None
) -> bool:
    """Create ``name``; True if created, False if it already existed.

    Without ``replication``, the cluster's (:func:`cluster_replication`), with its
    ``min.insync.replicas``.
    """
    admin = admin_client(settings)
    config: dict[str, str] = {}
    if replication is None:
        replication, min_isr = cluster_replication(settings, admin)
        config["min.insync.replicas"] = str(min_isr)
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication, config=config)],
        operation_timeout=settings.kafka_timeout_seconds,
        request_timeout=settings.kafka_timeout_seconds,
    )
    try:
        futures[name].result()
    except KafkaException as exc:
        refused(settings, exc)
        error = exc.args[0]
        if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise TopicError(f"cannot create topic {name!r}: {error.str()}") from None
    return True


def list_topics(settings: Settings, *, include_internal: bool = False) -> list[TopicInfo]:
    try:
        metadata = admin_client(settings).list_topics(timeout=settings.kafka_timeout_seconds)
    except KafkaException as exc:
        refused(settings, exc)
        raise KafkaUnavailableError(
            f"cannot list topics at {settings.addresses()['kafka']}: {exc}"
        ) from None
    topics = []
    for name, topic in sorted(metadata.topics.items()):
        if name.startswith("__") and not include_internal:
            continue
        replication = max((len(p.replicas) for p in topic.partitions.values()), default=0)
        topics.append(TopicInfo(name, len(topic.partitions), replication))
    return topics


def require_topic(settings: Settings, topic: str) -> int:
    """The partition count of ``topic``; TopicError that says how to create it if missing."""
    try:
        metadata = admin_client(settings).list_topics(topic, timeout=settings.kafka_timeout_seconds)
    except KafkaException as exc:
        refused(settings, exc)
        raise KafkaUnavailableError(
            f"cannot reach Kafka at {settings.addresses()['kafka']}: {exc}"
        ) from None
    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise TopicError(
            f"topic {topic!r} does not exist at {settings.addresses()['kafka']}; create it with "
            f"`stockflow topics create {topic} --partitions N`"
        )
    return len(found.partitions)


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def describe_topic(settings: Settings, name: str) -> TopicDescription:
    """``name``'s partitions with their leader, replicas, in-sync replicas and end offset;
    TopicError (one line) if the topic does not exist."""
    admin = admin_client(settings)  # kept alive until the futures are done
    timeout = settings.kafka_timeout_seconds
    future = admin.describe_topics(TopicCollection([name]), request_timeout=timeout)[name]
    try:
        description = future.result()
    except KafkaException as exc:
        error = _kafka_error(exc)
        if error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise TopicError(f"topic {name!r} does not exist") from None
        if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._TIMED_OUT):
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {settings.addresses()['kafka']}: {error.str()}"
            ) from None
        raise TopicError(f"cannot describe topic {name!r}: {exc}") from None
    ends = latest_offsets(settings, [(name, p.id) for p in description.partitions], admin=admin)
    uid = description.topic_id
    known = uid is not None and (
        uid.get_most_significant_bits(),
        uid.get_least_significant_bits(),
    ) != (0, 0)
    return TopicDescription(
        name,
        str(uid) if known else None,
        [
            PartitionInfo(
                p.id,
                p.leader.id if p.leader is not None else None,
                [node.id for node in p.replicas],
                [node.id for node in p.isr],
                ends[(name, p.id)],
            )
            for p in sorted(description.partitions, key=lambda p: p.id)
        ],
    )


LEADER_CHANGING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.OFFSET_NOT_AVAILABLE,
        KafkaError.REPLICA_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,  # a new leader not yet told of the partition
    }
)
"""Answers of a partition whose leadership is moving: asked again, they pass once it settled."""


def latest_offsets(
    settings: Settings, partitions: Iterable[tuple[str, int]], *, admin: AdminClient | None = None
) -> dict[tuple[str, int], int]:
    """The end offset (high watermark) of each ``(topic, partition)``.

    A partition whose leader is moving (a broker killed or restarted: ``LEADER_CHANGING`` and
    librdkafka's retriable errors) is asked again until it answers, for up to the Kafka
    timeout; TopicError after that, or at once for any other error.
    """
    admin = admin or admin_client(settings)
    latest = cast(Callable[[], OffsetSpec], OffsetSpec.latest)()  # the library leaves it untyped
    pending = {TopicPartition(topic, p) for topic, p in partitions}
    ends: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + settings.kafka_timeout_seconds
    while pending:
        futures = admin.list_offsets(
            dict.fromkeys(pending, latest), request_timeout=settings.kafka_timeout_seconds
        )
        moving: list[KafkaError] = []
        for tp, future in futures.items():
            try:
                ends[(tp.topic, tp.partition)] = future.result().offset
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if not (error.retriable() or error.code() in LEADER_CHANGING):
                    raise TopicError(f"cannot read end offsets: {error}") from None
                moving.append(error)
                continue
            pending.discard(tp)
        if pending and time.monotonic() + 0.5 > deadline:
            raise TopicError(
                f"cannot read end offsets of {len(pending)} partition(s) within "
                f"{settings.kafka_timeout_seconds:g}s: {moving[0] if moving else 'no answer'}"
            )
        if pending:
            time.sleep(0.5)
    return ends


def topic_id(settings: Settings, name: str) -> str | None:
    """Kafka's id of topic ``name``: a topic deleted and recreated under the same name gets a
    new one. None if the cluster gives topics no ids; TopicError if the topic is missing."""
    admin = admin_client(settings)  # kept alive until the future is done
    futures = admin.describe_topics(
        TopicCollection([name]), request_timeout=settings.kafka_timeout_seconds
    )
    try:
        description = futures[name].result()
    except KafkaException as exc:
        refused(settings, exc)
        raise TopicError(f"cannot describe topic {name!r}: {exc.args[0].str()}") from None
    uid = description.topic_id
    if uid is None or (uid.get_most_significant_bits(), uid.get_least_significant_bits()) == (0, 0):
        return None
    return str(uid)


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """The next offset of each partition of ``topic`` (where a new message would go)."""
    consumer = Consumer(kafka_clients.offsets_probe(settings, group_id="stockflow-offsets-probe"))
    try:
        metadata = consumer.list_topics(topic, timeout=settings.kafka_timeout_seconds)
        partitions = metadata.topics[topic].partitions
        if metadata.topics[topic].error is not None:
            raise TopicError(f"topic {topic!r}: {metadata.topics[topic].error.str()}")
        offsets = {}
        for pid in partitions:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, pid), timeout=settings.kafka_timeout_seconds
            )
            offsets[pid] = high
        return offsets
    except KafkaException as exc:
        refused(settings, exc)
        raise TopicError(f"cannot read the end offsets of {topic!r}: {exc}") from None
    finally:
        consumer.close()


def group_lag(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """Messages of each partition of ``topic`` that ``group`` has not committed yet.

    On a topic written in transactions the end offset also counts commit markers, so a group
    that has read everything may still show one there.
    """
    ends = end_offsets(settings, topic)
    consumer = Consumer(kafka_clients.offsets_probe(settings, group_id=group))
    try:
        committed = consumer.committed(
            [TopicPartition(topic, pid) for pid in ends], timeout=settings.kafka_timeout_seconds
        )
    except KafkaException as exc:
        refused(settings, exc)
        raise TopicError(f"cannot read group {group!r}'s offsets on {topic!r}: {exc}") from None
    finally:
        consumer.close()
    lag = {}
    for tp in committed:
        start = tp.offset if tp.offset >= 0 else 0
        lag[tp.partition] = max(0, ends[tp.partition] - start)
    return lag


def delete_topics(settings: Settings, names: list[str]) -> None:
    """Delete these topics (those that exist); TopicError if Kafka refuses."""
    if not names:
        return
    admin = admin_client(settings)  # kept alive until the futures are done
    futures = admin.delete_topics(names, operation_timeout=settings.kafka_timeout_seconds)
    for name, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            refused(settings, exc)
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise TopicError(f"cannot delete topic {name!r}: {exc.args[0].str()}") from None
