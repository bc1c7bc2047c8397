"""What happened to an order: the outcome enum and the result record the processor returns."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    """The end state of one order message."""

    APPLIED = "applied"
    """Stock was decremented by the order's quantity."""
    INSUFFICIENT_STOCK = "insufficient_stock"
    """The product has less stock than ordered; stock is unchanged."""
    UNKNOWN_PRODUCT = "unknown_product"
    """No product has the order's productId; nothing changed."""
    INVALID = "invalid"
    """The message is not a valid order (see the reason); nothing changed."""


@dataclass(frozen=True, slots=True)
class OrderResult:
    """The outcome of one order, with the stock after it when the product exists."""

    outcome: Outcome
    product_id: int | None
    quantity: int | None
    stock_after: int | None = None
    reason: str | None = None
