"""Stage 1: validate every input message and route it by product, or dead-letter it.

Input producers may put one product's orders on any partition (no key, round robin, another
partitioner). The router re-publishes each valid order or restock to the commands topic keyed
by its product, so every stock change of a product reaches one partition and so exactly one
applier: the single writer per product that stockflow's correctness rests on. Invalid messages
go to the dead-letter topic with their original bytes and headers plus the reason. Outputs and
input offsets are committed in one transaction (``txloop``), so nothing is routed twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from confluent_kafka import Message

from stockflow.config import Settings
from stockflow.deadletters import dead_letter_headers
from stockflow.errors import InvalidOrderError
from stockflow.orders import Command, decode_command
from stockflow.outcomes import Source, source_of
from stockflow.retry import CircuitBreaker
from stockflow.txloop import Handled, Output

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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.breaker = CircuitBreaker("router")

    def handle(self, messages: Sequence[Message]) -> Handled:
        outputs: list[Output] = []
        counts: Counter[str] = Counter()
        for message in messages:
            source = source_of(message)
            try:
                command = decode_message(self.settings, message)
            except InvalidOrderError as exc:
                log.warning("Dead-lettered %s: %s", source, exc.reason)
                outputs.append(self.dead_letter(message, exc.reason, 1))
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
        return Handled(outputs, counts=counts)

    def dead_letter(self, message: Message, reason: str, attempts: int) -> Output:
        return Output(
            self.settings.dlq_topic,
            message.value(),
            key=message.key(),
            headers=dead_letter_headers(
                reason, source_of(message), attempts=attempts, original=message.headers()
            ),
        )
