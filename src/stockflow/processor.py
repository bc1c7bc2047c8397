"""What happens to one order, in the seed's steps and with the seed's log lines."""

from __future__ import annotations

import logging

from stockflow.cache import ProductCache
from stockflow.inventory import Inventory, Product
from stockflow.orders import Order
from stockflow.outcomes import OrderResult, Outcome

log = logging.getLogger("stockflow.orders")


class OrderProcessor:
    """Applies orders to stock, reading products through the cache."""

    def __init__(self, inventory: Inventory, cache: ProductCache) -> None:
        self.inventory = inventory
        self.cache = cache

    def lookup(self, product_id: int) -> Product | None:
        """Cache-aside read: Redis first; on a miss MongoDB, then fill the cache."""
        product = self.cache.get(product_id)
        if product is None:
            product = self.inventory.find_product(product_id)
            if product is not None:
                self.cache.put(product_id, product)
        return product

    def handle(self, order: Order) -> OrderResult:
        """Process one order.

        1. Look the product up through the cache (miss: MongoDB, then fill the cache).
        2. Refuse it when the product is unknown or ``stock - quantity < 0``.
        3. Apply it with the guarded update (the only write), which re-checks the stock.
        4. Invalidate the product's cache entry, so the next read sees the new stock.
        """
        pid, qty = order.product_id, order.quantity
        log.info("Processing order for product %s, quantity: %s", pid, qty)
        product = self.lookup(pid)
        if product is None:
            log.warning("Unknown product %s: order %s rejected", pid, order.order_id)
            return OrderResult(Outcome.UNKNOWN_PRODUCT, pid, qty)
        if int(product["stock"]) - qty < 0:
            return self._insufficient(order, int(product["stock"]))
        result = self.inventory.apply_order(order)
        self.cache.invalidate(pid)
        if result.outcome is Outcome.APPLIED:
            log.info("Product stock updated for product %s, new stock: %s", pid, result.stock_after)
        elif result.outcome is Outcome.INSUFFICIENT_STOCK:
            return self._insufficient(order, result.stock_after)
        else:
            log.warning("Unknown product %s: order %s rejected", pid, order.order_id)
        return result

    def _insufficient(self, order: Order, available: int | None) -> OrderResult:
        log.info(
            "Insufficient stock for product %s: ordered %s, in stock %s (order %s not applied)",
            order.product_id,
            order.quantity,
            available,
            order.order_id,
        )
        return OrderResult(Outcome.INSUFFICIENT_STOCK, order.product_id, order.quantity, available)
