"""Product reads for people and other services: Redis first, then MongoDB (cache-aside)."""

from __future__ import annotations

from stockflow.cache import Product, ProductCache, public_view
from stockflow.inventory import Inventory


class ProductReader:
    """Cache-aside reads of products, as in the seed: a miss reads MongoDB and fills Redis."""

    def __init__(self, inventory: Inventory, cache: ProductCache) -> None:
        self.inventory = inventory
        self.cache = cache

    def lookup(self, product_id: int) -> Product | None:
        """The product without stockflow's bookkeeping, or None if there is no such product."""
        product = self.cache.get(product_id)
        if product is not None:
            return product
        doc = self.inventory.products.find_one({"product_id": product_id})
        if doc is None:
            return None
        self.cache.put(product_id, doc)  # refused if a writer stored a newer version meanwhile
        return public_view(doc)
