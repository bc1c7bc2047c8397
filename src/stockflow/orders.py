"""The order message: ``{"orderId", "productId", "quantity"}`` as JSON, decoded strictly.

Decoding never raises anything but :class:`InvalidOrderError`, whose ``reason`` names the
first problem found, so a consumer can reject one message and carry on with the next.
Types are exact: ``"101"`` is not a product id, ``true`` is not a quantity and an object
(``{"$gt": 0}``) is never accepted where a scalar belongs, which also closes the door on
MongoDB operator injection through the message.
"""

from __future__ import annotations

import msgspec

from stockflow.errors import InvalidOrderError

MAX_MESSAGE_BYTES = 64 * 1024
"""Orders are a few dozen bytes; anything this large is not an order."""
MAX_QUANTITY = 10_000
"""Default ceiling on one order's quantity; larger values are refused as absurd."""
MAX_ORDER_ID_LENGTH = 128
MAX_PRODUCT_ID = 2**53 - 1
"""The largest integer every JSON implementation reads exactly (and BSON stores as int64)."""


class Order(msgspec.Struct, frozen=True, rename="camel"):
    """One order: take ``quantity`` units of product ``product_id`` out of stock."""

    order_id: int | str
    product_id: int
    quantity: int

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @property
    def key(self) -> bytes:
        """The Kafka key: the product, so every change to one product shares a partition."""
        return str(self.product_id).encode()


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Order)


def decode_order(
    payload: bytes | None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_quantity: int = MAX_QUANTITY,
) -> Order:
    """Parse and validate one message value; raise InvalidOrderError with the reason."""
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
    try:
        order = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise InvalidOrderError(f"invalid order: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidOrderError(f"malformed JSON: {exc}") from None
    validate(order, max_quantity=max_quantity)
    return order


def validate(order: Order, *, max_quantity: int = MAX_QUANTITY) -> None:
    """Check the value ranges the types alone cannot express."""
    if isinstance(order.order_id, str):
        if not order.order_id.strip():
            raise InvalidOrderError("orderId is empty")
        if len(order.order_id) > MAX_ORDER_ID_LENGTH:
            raise InvalidOrderError(f"orderId longer than {MAX_ORDER_ID_LENGTH} characters")
    elif not -MAX_PRODUCT_ID <= order.order_id <= MAX_PRODUCT_ID:
        raise InvalidOrderError("orderId is out of the exactly representable integer range")
    if not 0 < order.product_id <= MAX_PRODUCT_ID:
        raise InvalidOrderError(f"productId must be a positive integer, got {order.product_id}")
    if order.quantity < 1:
        raise InvalidOrderError(f"quantity must be at least 1, got {order.quantity}")
    if order.quantity > max_quantity:
        raise InvalidOrderError(f"quantity {order.quantity} exceeds the maximum of {max_quantity}")
