"""What happened to a stock change: the outcome enum and the outcome event.

Every message on the input topic ends in exactly one outcome: an order or restock that was
applied or rejected (recorded in MongoDB and published on ``<topic>.outcomes``), a duplicate
of an earlier one (published, and noted on the original's record), or a dead letter
(``<topic>.dlq``: the original bytes, with the reason and source in headers).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class Outcome(StrEnum):
    """The end state of one message."""

    APPLIED = "applied"
    """Stock changed by the order's (minus) or restock's (plus) quantity."""
    INSUFFICIENT_STOCK = "insufficient_stock"
    """The product has less stock than ordered; stock is unchanged."""
    UNKNOWN_PRODUCT = "unknown_product"
    """No product has this productId; nothing changed."""
    DUPLICATE = "duplicate"
    """An order (or restock) with this id was seen before; this copy changed nothing."""
    DEAD_LETTERED = "dead_lettered"
    """Not a valid message, or one that kept failing; its bytes are on the dead-letter topic."""


class Source(msgspec.Struct, frozen=True, array_like=True):
    """Where a message was read: topic, partition, offset."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Source | None:
        """The inverse of ``str()``: ``topic[partition]@offset``."""
        topic, _, rest = text.rpartition("[")
        partition, _, offset = rest.partition("]@")
        try:
            return cls(topic, int(partition), int(offset))
        except ValueError:
            return None


class OutcomeEvent(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """One message on the outcomes topic (keyed by product), and one record in MongoDB."""

    kind: str
    """``order`` or ``restock``."""
    product_id: int
    quantity: int
    status: Outcome
    stock_after: int | None = None
    reason: str | None = None
    source: Source | None = None
    """Where the message was on the input topic."""
    at: float = 0.0
    """When the outcome became durable (Unix time, seconds)."""
    order_id: int | str | None = None
    """The order's ``orderId`` (orders only): ids are named as the input names them."""
    restock_id: int | str | None = None
    """The restock's ``restockId`` (restocks only)."""

    @property
    def ident(self) -> int | str | None:
        """The order's or restock's id, whichever this is."""
        return self.order_id if self.kind == "order" else self.restock_id

    def encode(self) -> bytes:
        return _encoder.encode(self)


def source_of(message: Any) -> Source:
    """Where a Kafka message was read."""
    return Source(message.topic() or "", message.partition() or 0, message.offset() or 0)


_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(OutcomeEvent)


def decode_event(payload: bytes) -> OutcomeEvent:
    return _event_decoder.decode(payload)


Headers = list[tuple[str, str | bytes | None]]
"""Kafka message headers as librdkafka takes them."""
