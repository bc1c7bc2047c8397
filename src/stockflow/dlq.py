"""Reading the dead-letter topic, and replaying fixed dead letters into the input topic."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

from stockflow.config import Settings
from stockflow.errors import TopicError
from stockflow.outcomes import (
    H_ATTEMPTS,
    H_REASON,
    H_TIME,
    Source,
    dead_letter_source,
    header_map,
)
from stockflow.producer import OrderProducer
from stockflow.router import H_SOURCE_ID

H_REPLAYED_FROM = "stockflow.replayed-from"


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    source: Source | None
    time: float | None
    attempts: int
    source_id: str | None = None
    """Kafka's id of the input topic the message was read from, if recorded."""

    @property
    def ref(self) -> str:
        """How the CLI names it: ``partition:offset``."""
        return f"{self.partition}:{self.offset}"


def read_topic_to_end(settings: Settings, topic: str) -> Iterator[object]:
    """Every committed message of ``topic`` up to its end as of now, partition by partition."""
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"stockflow-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
    )
    try:
        metadata = consumer.list_topics(topic, timeout=settings.kafka_timeout_seconds)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None:
            raise TopicError(f"topic {topic!r} does not exist")
        for partition in sorted(info.partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=settings.kafka_timeout_seconds
            )
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            while True:
                batch = consumer.consume(1000, 2.0)
                if not batch:
                    # Transaction markers occupy offsets: an empty read means the end.
                    break
                done = False
                for msg in batch:
                    if msg.error() is not None:
                        continue
                    yield msg
                    if (msg.offset() or 0) >= high - 1:
                        done = True
                if done:
                    break
    finally:
        consumer.close()


def read_dead_letters(settings: Settings) -> list[DeadLetter]:
    letters = []
    for msg in read_topic_to_end(settings, settings.dlq_topic):
        headers = msg.headers()  # type: ignore[attr-defined]
        found = header_map(headers)
        try:
            at: float | None = float(found[H_TIME])
        except (KeyError, ValueError):
            at = None
        letters.append(
            DeadLetter(
                partition=msg.partition(),  # type: ignore[attr-defined]
                offset=msg.offset(),  # type: ignore[attr-defined]
                key=msg.key(),  # type: ignore[attr-defined]
                value=msg.value(),  # type: ignore[attr-defined]
                reason=found.get(H_REASON, "?"),
                source=dead_letter_source(headers),
                time=at,
                attempts=int(found.get(H_ATTEMPTS, "1") or 1),
                source_id=found.get(H_SOURCE_ID),
            )
        )
    return letters


def replay(settings: Settings, letters: Sequence[DeadLetter], *, value: bytes | None = None) -> int:
    """Publish these dead letters (or ``value`` in their place) to the input topic again."""
    with OrderProducer(settings) as producer:
        for letter in letters:
            producer.send_raw(
                value if value is not None else (letter.value or b""),
                key=letter.key,
                headers={H_REPLAYED_FROM: f"{settings.dlq_topic}/{letter.ref}".encode()},
            )
    return len(letters)
