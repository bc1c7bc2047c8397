"""The messages: orders ``{"orderId", "productId", "quantity"}`` (and an optional
``customerId``) and restocks ``{"restockId", "productId", "quantity"}``, as JSON, decoded strictly.

Decoding never raises anything but :class:`InvalidOrderError`, whose ``reason`` names the
first problem found, so a consumer can reject one message and carry on with the next.
Types are exact: ``"101"`` is not a product id, ``true`` is not a quantity and an object
(``{"$gt": 0}``) is never accepted where a scalar belongs, which also closes the door on
MongoDB operator injection through the message.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import ClassVar, Literal

import msgspec

from stockflow.errors import InvalidOrderError

MAX_MESSAGE_BYTES = 64 * 1024
"""Orders are a few dozen bytes; anything this large is not an order."""
MAX_QUANTITY = 10_000
"""Default ceiling on one order's quantity; larger values are refused as absurd."""
MAX_ORDER_ID_LENGTH = 128
MAX_PRODUCT_ID = 2**53 - 1
"""The largest integer every JSON implementation reads exactly (and BSON stores as int64)."""
MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted (an order is one object; extra fields may
nest a little). The JSON parser recurses per level: a message nested a thousand deep would
otherwise end in a RecursionError instead of a reason."""


class Order(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """One order: take ``quantity`` units of product ``product_id`` out of stock.

    ``customer_id`` (optional) only says who ordered: the ``customer`` partitioner keys by it.
    """

    order_id: int | str
    product_id: int
    quantity: int
    customer_id: int | str | None = None

    kind: ClassVar[Literal["order"]] = "order"

    @property
    def id(self) -> int | str:
        return self.order_id

    @property
    def delta(self) -> int:
        """The change to stock when applied."""
        return -self.quantity

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @property
    def key(self) -> bytes:
        """The Kafka key: the product, so every change to one product shares a partition."""
        return str(self.product_id).encode()


class Restock(msgspec.Struct, frozen=True, rename="camel"):
    """A restock: add ``quantity`` units to product ``product_id``; travels like an order."""

    restock_id: int | str
    product_id: int
    quantity: int

    kind: ClassVar[Literal["restock"]] = "restock"

    @property
    def id(self) -> int | str:
        return self.restock_id

    @property
    def delta(self) -> int:
        """The change to stock when applied."""
        return self.quantity

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @property
    def key(self) -> bytes:
        return str(self.product_id).encode()


Command = Order | Restock
"""Anything that changes stock."""


class _Wire(msgspec.Struct, frozen=True, rename="camel"):
    """What the topic may carry: an order or a restock, told apart by which id is present."""

    product_id: int
    quantity: int
    order_id: int | str | msgspec.UnsetType = msgspec.UNSET
    restock_id: int | str | msgspec.UnsetType = msgspec.UNSET
    customer_id: int | str | msgspec.UnsetType = msgspec.UNSET


_encoder = msgspec.json.Encoder()
_wire_decoder = msgspec.json.Decoder(_Wire)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
"""A JSON string, escapes included: what is inside one is text, not nesting."""
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_NESTING = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _NESTING[_open], _NESTING[_close] = 1, -1


def _check_depth(payload: bytes) -> None:
    """Refuse arrays and objects nested deeper than MAX_DEPTH, before the parser recurses.

    Runs at C speed (a regular expression, ``translate``, ``accumulate``): a few milliseconds
    for the worst 64 KB message, a microsecond for an order.
    """
    if payload.count(b"[") + payload.count(b"{") <= MAX_DEPTH:
        return  # the common case: too few brackets to be too deep, whatever the strings hold
    brackets = _STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    if brackets and max(accumulate(map(_NESTING.__getitem__, brackets))) > MAX_DEPTH:
        raise InvalidOrderError(f"message nested deeper than {MAX_DEPTH} levels")


def _short(value: object, limit: int = 40) -> str:
    """A value for a reason: long ones cut, so a reason stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}...({len(text)} chars)"


def _check_payload(payload: bytes | None, max_bytes: int) -> bytes:
    if payload is None or len(payload) == 0:
        raise InvalidOrderError("empty message")
    if len(payload) > max_bytes:
        raise InvalidOrderError(
            f"message of {len(payload)} bytes exceeds the {max_bytes}-byte limit"
        )
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidOrderError(f"message is not valid UTF-8 (byte {exc.start})") from None
    _check_depth(payload)
    return payload


def decode_command(
    payload: bytes | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_quantity: int = MAX_QUANTITY,
) -> Command:
    """Parse and validate an order or a restock; raise InvalidOrderError with the reason."""
    try:
        wire = _wire_decoder.decode(_check_payload(payload, max_bytes))
    except msgspec.ValidationError as exc:
        raise InvalidOrderError(f"invalid order: {str(exc)[:150]}") from None
    except msgspec.DecodeError as exc:
        raise InvalidOrderError(f"malformed JSON: {str(exc)[:150]}") from None
    except RecursionError:
        # Not expected after the depth check; a reason is still better than a traceback.
        raise InvalidOrderError("message nested too deeply to parse") from None
    command: Command
    if isinstance(wire.order_id, int | str) and wire.restock_id is msgspec.UNSET:
        customer = None if wire.customer_id is msgspec.UNSET else wire.customer_id
        command = Order(wire.order_id, wire.product_id, wire.quantity, customer)
    elif isinstance(wire.restock_id, int | str) and wire.order_id is msgspec.UNSET:
        command = Restock(wire.restock_id, wire.product_id, wire.quantity)
    else:
        raise InvalidOrderError(
            "invalid order: a message needs exactly one of `orderId` or `restockId`"
        )
    validate(command, max_quantity=max_quantity)
    return command


def decode_order(
    payload: bytes | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_quantity: int = MAX_QUANTITY,
) -> Order:
    """Parse and validate one order (a restock is refused); raise InvalidOrderError."""
    command = decode_command(payload, max_bytes=max_bytes, max_quantity=max_quantity)
    if not isinstance(command, Order):
        raise InvalidOrderError("invalid order: expected an order, got a restock")
    return command


def validate(command: Command, *, max_quantity: int = MAX_QUANTITY) -> None:
    """Check the value ranges the types alone cannot express."""
    _check_id("orderId" if command.kind == "order" else "restockId", command.id)
    if isinstance(command, Order) and command.customer_id is not None:
        _check_id("customerId", command.customer_id)
    if not 0 < command.product_id <= MAX_PRODUCT_ID:
        raise InvalidOrderError(
            f"productId must be a positive integer, got {_short(command.product_id)}"
        )
    if command.quantity < 1:
        raise InvalidOrderError(f"quantity must be at least 1, got {_short(command.quantity)}")
    if command.quantity > max_quantity:
        raise InvalidOrderError(
            f"quantity {_short(command.quantity)} exceeds the maximum of {max_quantity}"
        )


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode's control characters (category Cc): U+0000-U+001F and U+007F-U+009F."""


def _check_id(name: str, ident: int | str) -> None:
    """An id is a non-empty string of bounded length or an exactly representable integer."""
    if isinstance(ident, str):
        if not ident.strip():
            raise InvalidOrderError(f"{name} is empty")
        if len(ident) > MAX_ORDER_ID_LENGTH:
            raise InvalidOrderError(f"{name} longer than {MAX_ORDER_ID_LENGTH} characters")
        # Every control character is unprintable, so a printable id (nearly all) is cleared
        # by one C-speed call; a per-character check cost more than the rest of decoding.
        if not ident.isprintable() and _CONTROL.search(ident):
            # PostgreSQL (behind FerretDB) cannot store a NUL in text; no id needs any of these.
            raise InvalidOrderError(f"{name} contains a control character")
    elif not -MAX_PRODUCT_ID <= ident <= MAX_PRODUCT_ID:
        raise InvalidOrderError(f"{name} is out of the exactly representable integer range")
