"""Reading the dead-letter topic, getting dead letters' originals, and replaying them.

A dead letter on the topic may carry only part of its message (``deadletters``); its whole
original is in MongoDB. Replay re-sends the whole original (or a corrected value) to the input
topic, marked with ``stockflow.replayed-from`` so the audit can follow it.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from pymongo.errors import PyMongoError

from stockflow.config import Settings
from stockflow.deadletters import (
    H_ATTEMPTS,
    H_ORIGINAL_TOPIC,
    H_REASON,
    H_SHA256,
    H_SIZE,
    H_SOURCE_ID,
    H_STAGE,
    H_TIME,
    H_TRUNCATED,
    DeadLetterStore,
    dead_letter_source,
    header_map,
)
from stockflow.errors import StockflowError, TopicError
from stockflow.outcomes import Source
from stockflow.producer import OrderProducer

log = logging.getLogger(__name__)

H_REPLAYED_FROM = "stockflow.replayed-from"
"""Header on a replayed message: ``<dlq topic>/<partition>:<offset>`` of its dead letter."""


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
    headers: list[tuple[str, bytes]]
    """The original message's headers carried by the dead letter (stockflow's own removed)."""
    stage: str = "?"
    size: int | None = None
    """The original message's size in bytes (None: a dead letter from before sizes)."""
    sha256: str | None = None
    truncated: tuple[str, ...] = ()
    """What the topic's record lacks of the original (``value``, ``headers``, ``key``)."""
    source_id: str | None = None
    """Kafka's id of the input topic the message was read from, if recorded."""

    @property
    def ref(self) -> str:
        """How the CLI names it: ``partition:offset``."""
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True)
class Original:
    """A dead-lettered message whole: from the topic, or from MongoDB when the topic has part."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.value).hexdigest()


def parse_ref(ref: str) -> tuple[int, int]:
    """``partition:offset`` as numbers; StockflowError for anything else."""
    partition, sep, offset = ref.partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise StockflowError(f"not a dead letter ref: {ref!r} (expected PARTITION:OFFSET)")
    return int(partition), int(offset)


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
        headers = msg.headers() or []  # type: ignore[attr-defined]
        found = header_map(headers)
        try:
            at: float | None = float(found[H_TIME])
        except (KeyError, ValueError):
            at = None
        size = found.get(H_SIZE, "")
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
                headers=[
                    (k, v.encode() if isinstance(v, str) else (v or b""))
                    for k, v in headers
                    if not k.startswith("stockflow.")
                ],
                stage=found.get(H_STAGE, "?"),
                size=int(size) if size.isdigit() else None,
                sha256=found.get(H_SHA256),
                truncated=_truncated(found, msg.value()),  # type: ignore[attr-defined]
                source_id=found.get(H_SOURCE_ID),
            )
        )
    return letters


def _truncated(found: Mapping[str, str], value: bytes | None) -> tuple[str, ...]:
    cut = tuple(t for t in found.get(H_TRUNCATED, "").split(",") if t)
    if not cut and value is None and H_ORIGINAL_TOPIC in found:
        # The loop's last-resort dead letter of an output nothing could produce carries no
        # payload; the handler's dead letter it replaced had kept its original in MongoDB.
        return ("value",)
    return cut


def original_of(letter: DeadLetter, store: DeadLetterStore) -> Original:
    """The whole original of a dead letter: the topic's record, or MongoDB's copy when the
    record was cut. StockflowError when neither has it whole."""
    if not letter.truncated:
        return Original(letter.value or b"", letter.key, letter.headers)
    doc = store.get(letter.source) if letter.source is not None else None
    if doc is None:
        raise StockflowError(
            f"dead letter {letter.ref} was cut to fit the topic ({', '.join(letter.truncated)}) "
            "and its original is not in MongoDB's dead_letters collection"
        )
    original = Original(
        bytes(doc.get("value") or b""),
        bytes(doc["key"]) if doc.get("key") is not None else None,
        [(str(h["name"]), bytes(h["value"])) for h in doc.get("headers") or []],
    )
    if letter.sha256 is not None and original.sha256 != letter.sha256:
        raise StockflowError(f"dead letter {letter.ref}: the kept original's digest differs")
    return original


def select(
    letters: Sequence[DeadLetter],
    *,
    refs: Sequence[str] = (),
    reason: str | None = None,
    every: bool = False,
) -> list[DeadLetter]:
    """The dead letters named by ``refs``, or whose reason contains ``reason`` (case
    ignored), or all of them; in topic order. StockflowError for a ref that names none."""
    by_ref = {letter.ref: letter for letter in letters}
    chosen: set[str] = set()
    for ref in refs:
        parse_ref(ref)
        if ref not in by_ref:
            raise StockflowError(f"no dead letter {ref} (see `stockflow dlq list`)")
        chosen.add(ref)
    if reason is not None:
        chosen |= {ref for ref, letter in by_ref.items() if reason.lower() in letter.reason.lower()}
    if every:
        chosen = set(by_ref)
    return [letter for letter in letters if letter.ref in chosen]


def replay(
    settings: Settings,
    letters: Sequence[DeadLetter],
    store: DeadLetterStore,
    *,
    value: bytes | None = None,
) -> int:
    """Publish these dead letters' originals (or ``value`` in their place) to the input topic
    again, marked with where they come from; returns how many were sent."""
    originals = [original_of(letter, store) for letter in letters]  # all found before any sent
    # The original reached the input topic, so the broker takes it; librdkafka's own default
    # limit (1,000,000 bytes) is lower than the broker's.
    config: dict[str, Any] = {"message.max.bytes": 16 * 1024 * 1024}
    with OrderProducer(settings, **config) as producer:
        for letter, original in zip(letters, originals, strict=True):
            marker = f"{settings.dlq_topic}/{letter.ref}"
            producer.send_raw(
                value if value is not None else original.value,
                key=original.key,
                headers=[*original.headers, (H_REPLAYED_FROM, marker.encode())],
            )
    try:
        for letter in letters:
            if letter.source is not None:
                store.mark_replayed(letter.source, f"{settings.dlq_topic}/{letter.ref}")
    except PyMongoError as exc:  # the copies are sent: only the note is missing
        log.warning("replayed, but could not note it in MongoDB: %s", exc)
    return len(letters)
