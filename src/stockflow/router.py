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
from collections.abc import Sequence

from confluent_kafka import Message

from stockflow.config import Settings
from stockflow.consumer import Handled, Output
from stockflow.deadletters import DeadLetterStore, FittedLetter, build, size_limit
from stockflow.errors import InvalidOrderError
from stockflow.orders import Command, decode_command
from stockflow.outcomes import Source, source_of
from stockflow.retry import CircuitBreaker

log = logging.getLogger(__name__)

H_SOURCE = "stockflow.source"
"""Header on a command: where it was on the input topic, as ``topic/partition/offset``."""
H_CREATED = "stockflow.created"
"""Header on a command: the input message's timestamp (ms), for latency measurements."""


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

    def __init__(self, settings: Settings, store: DeadLetterStore) -> None:
        self.settings = settings
        self.store = store
        self.limit = size_limit(settings)
        self.breaker = CircuitBreaker("router")

    def handle(self, messages: Sequence[Message]) -> Handled:
        outputs: list[Output] = []
        letters: list[FittedLetter] = []
        counts: Counter[str] = Counter()
        for message in messages:
            source = source_of(message)
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
                    headers=[(H_SOURCE, encode_source(source)), (H_CREATED, str(created).encode())],
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
        )

    def _output(self, letter: FittedLetter) -> Output:
        return Output(
            self.settings.dlq_topic,
            letter.value,
            key=letter.key,
            headers=letter.headers,
            source=letter.source,
        )
