"""Stage 1: validate every input message and route it by product, or dead-letter it.

Input producers may put one product's orders on any partition (no key, round robin, another
partitioner). The router re-publishes each valid order or restock to the commands topic keyed
by its product, so every stock change of a product reaches one partition and so exactly one
applier: the single writer per product that stockflow's correctness rests on. Invalid messages
go to the dead-letter topic with their original bytes and headers plus the reason (cut to fit,
the whole original kept in MongoDB: ``deadletters``). Outputs and input offsets are committed
in one transaction (``consumer``), so nothing is routed twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

from confluent_kafka import Message

from stockflow.config import Settings
from stockflow.consumer import Handled, Output
from stockflow.deadletters import DeadLetterStore, FittedLetter, build, size_limit
from stockflow.errors import InvalidOrderError, TopicError, TransientError
from stockflow.orders import Command, decode_command
from stockflow.outcomes import Source, source_of
from stockflow.retry import CircuitBreaker

log = logging.getLogger(__name__)

H_SOURCE = "stockflow.source"
"""Header on a command: where it was on the input topic, as ``topic/partition/offset``."""
H_CREATED = "stockflow.created"
"""Header on a command: the input message's timestamp (ms), for latency measurements."""
H_SOURCE_ID = "stockflow.source.id"
"""Header on a command: Kafka's id of the input topic (absent when the cluster gives topics no
ids). Dead letters carry it as ``stockflow.dlq.source.id``."""


def encode_source(source: Source) -> bytes:
    return f"{source.topic}/{source.partition}/{source.offset}".encode()


def decode_source(raw: str | bytes | None) -> Source | None:
    if not raw:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    topic, _, rest = text.rpartition("/")
    topic, _, partition = topic.rpartition("/")
    try:
        return Source(topic, int(partition), int(rest))
    except ValueError:
        return None


def decode_message(settings: Settings, message: Message) -> Command:
    """A message's order or restock, within the configured limits; InvalidOrderError if not."""
    return decode_command(
        message.value(),
        max_bytes=settings.max_message_bytes,
        max_quantity=settings.max_quantity,
    )


class Router:
    """The stage-1 handler."""

    name = "router"

    def __init__(
        self,
        settings: Settings,
        store: DeadLetterStore,
        *,
        topic_ids: Callable[[str], str | None] | None = None,
    ) -> None:
        """``topic_ids`` looks up Kafka's id of the input topic (None: no id is recorded)."""
        self.settings = settings
        self.store = store
        self.limit = size_limit(settings)
        self.breaker = CircuitBreaker("router")
        self.topic_ids = topic_ids
        self._known_ids: dict[str, str | None] = {}
        self._read: dict[tuple[str, int], int] = {}

    def on_partitions_changed(self) -> None:
        """The input topic may have been recreated meanwhile: learn its id again."""
        self._known_ids.clear()
        self._read.clear()

    def _learn_topic_id(self, message: Message) -> None:
        """Look the input topic's id up once, and again when a partition is read from an earlier
        offset than before (the topic recreated under this consumer, which librdkafka reads
        from its start again without any rebalance)."""
        if self.topic_ids is None:
            return
        topic, partition, offset = message.topic() or "", message.partition(), message.offset()
        key = (topic, partition or 0)
        if (offset or 0) <= self._read.get(key, -1):
            self._known_ids.pop(topic, None)
        self._read[key] = offset or 0
        if topic not in self._known_ids:
            try:
                self._known_ids[topic] = self.topic_ids(topic)
            except TopicError as exc:
                raise TransientError(f"cannot learn the id of topic {topic!r}: {exc}") from exc

    def _source_id(self, message: Message) -> str | None:
        """Kafka's id of the message's topic, if known."""
        return self._known_ids.get(message.topic() or "")

    def handle(self, messages: Sequence[Message]) -> Handled:
        outputs: list[Output] = []
        letters: list[FittedLetter] = []
        counts: Counter[str] = Counter()
        for message in messages:
            source = source_of(message)
            self._learn_topic_id(message)
            try:
                command = decode_message(self.settings, message)
            except InvalidOrderError as exc:
                log.warning("Dead-lettered %s: %s", source, exc.reason)
                letters.append(self._letter(message, exc.reason, 1))
                outputs.append(self._output(letters[-1]))
                counts["dead_lettered"] += 1
                continue
            _, created = message.timestamp()
            outputs.append(
                Output(
                    self.settings.commands_topic,
                    command.encode(),
                    key=command.key,
                    headers=[
                        (H_SOURCE, encode_source(source)),
                        (H_CREATED, str(created).encode()),
                        *(
                            [(H_SOURCE_ID, uid.encode())]
                            if (uid := self._source_id(message))
                            else []
                        ),
                    ],
                )
            )
            counts["routed"] += 1
        self.store.keep(letters)  # the originals are durable before the dead letters commit
        return Handled(outputs, counts=counts)

    def dead_letter(self, message: Message, reason: str, attempts: int) -> Output:
        """The dead letter of ``message`` (its original kept in MongoDB first)."""
        letter = self._letter(message, reason, attempts)
        self.store.keep([letter])
        return self._output(letter)

    def _letter(self, message: Message, reason: str, attempts: int) -> FittedLetter:
        return build(
            value=message.value(),
            key=message.key(),
            original_headers=message.headers(),
            reason=reason,
            source=source_of(message),
            attempts=attempts,
            stage=self.name,
            limit=self.limit,
            source_id=self._source_id(message),
        )

    def _output(self, letter: FittedLetter) -> Output:
        return Output(
            self.settings.dlq_topic,
            letter.value,
            key=letter.key,
            headers=letter.headers,
            source=letter.source,
        )
