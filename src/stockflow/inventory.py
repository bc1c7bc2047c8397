"""The MongoDB stock store: products in the seed's plain schema (``product_id``, ``stock``).

:meth:`Inventory.apply_order` is the one place an order changes stock. Its update is guarded
(``stock >= quantity`` in the filter, ``$inc`` in the change), so a stale read can never
drive stock below zero on MongoDB. FerretDB v1 evaluates that guard outside any lock, so
concurrent writers of one product are kept apart by the pipeline's design, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo import ASCENDING, MongoClient, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from stockflow.config import Settings
from stockflow.orders import Order
from stockflow.outcomes import OrderResult, Outcome

Product = dict[str, Any]

DEMO_PRODUCTS: Mapping[int, int] = {101: 100, 102: 50, 103: 25, 104: 10, 105: 0}
"""The demo catalogue: the seed's product 101 with stock 100, and a few more."""


def mongo_client(settings: Settings) -> MongoClient[Product]:
    """A client for the configured server (a real MongoDB or the local FerretDB)."""
    return MongoClient(
        settings.mongodb_url,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        appname="stockflow",
        tz_aware=True,
    )


class Inventory:
    """Product reads and stock changes against one collection."""

    def __init__(self, collection: Collection[Product]) -> None:
        self.products = collection

    @classmethod
    def from_settings(cls, settings: Settings, client: MongoClient[Product]) -> Inventory:
        return cls(client[settings.database][settings.products_collection])

    def ensure_indexes(self) -> None:
        """Index ``product_id`` (unique where the data allows it) so lookups stay cheap."""
        try:
            self.products.create_index([("product_id", ASCENDING)], unique=True)
        except OperationFailure:
            # An existing collection with duplicate product ids still gets a plain index.
            self.products.create_index([("product_id", ASCENDING)])

    def find_product(self, product_id: int) -> Product | None:
        """The product document without its ``_id``, or None."""
        return self.products.find_one({"product_id": product_id}, {"_id": 0})

    def stock_of(self, product_id: int) -> int | None:
        product = self.find_product(product_id)
        return None if product is None else int(product["stock"])

    def apply_order(self, order: Order) -> OrderResult:
        """Take the order's quantity out of stock if there is enough; never below zero.

        (No projection: FerretDB v1 does not implement ``fields`` in findAndModify.)
        """
        updated = self.products.find_one_and_update(
            {"product_id": order.product_id, "stock": {"$gte": order.quantity}},
            {"$inc": {"stock": -order.quantity}},
            return_document=ReturnDocument.AFTER,
        )
        if updated is not None:
            return OrderResult(
                Outcome.APPLIED, order.product_id, order.quantity, int(updated["stock"])
            )
        stock = self.stock_of(order.product_id)
        if stock is None:
            return OrderResult(Outcome.UNKNOWN_PRODUCT, order.product_id, order.quantity)
        return OrderResult(Outcome.INSUFFICIENT_STOCK, order.product_id, order.quantity, stock)

    def seed(self, products: Mapping[int, int]) -> None:
        """Create or reset these products to the given stock; other products are untouched."""
        self.products.bulk_write(
            [
                UpdateOne({"product_id": pid}, {"$set": {"stock": stock}}, upsert=True)
                for pid, stock in products.items()
            ]
        )

    def list_products(self, limit: int = 100) -> list[Product]:
        cursor = self.products.find({}, {"_id": 0}).sort("product_id", ASCENDING).limit(limit)
        return list(cursor)
