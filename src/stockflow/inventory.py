"""The MongoDB stock store: products in the seed's plain schema (``product_id``, ``stock``).

:meth:`Inventory.write_changes` is the one place stock changes. stockflow adds one field of
its own to a product it changes, ``_stockflow`` (see ``planner``), and needs no migration:
products written by anyone in the plain schema work as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pymongo import ASCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from stockflow.config import Settings
from stockflow.errors import ConcurrentWriteError
from stockflow.ledger import chunks
from stockflow.planner import MARKER, ProductChange

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

    def load(self, product_ids: Iterable[int]) -> dict[int, Product | None]:
        """The documents of these products (None for a missing one), by product id."""
        wanted = list(dict.fromkeys(product_ids))
        found: dict[int, Product | None] = dict.fromkeys(wanted)
        for chunk in chunks(wanted, 500):
            for doc in self.products.find({"product_id": {"$in": list(chunk)}}):
                pid = doc.get("product_id")
                if isinstance(pid, int) and found.get(pid) is None:
                    found[pid] = doc
        return found

    def write_changes(self, changes: Sequence[ProductChange]) -> None:
        """Compare-and-set each product; ConcurrentWriteError if another writer got there first.

        Each change is conditional on the stock and marker the plan was made from, so a second
        writer of the same product (a consumer that lost its partition but has not noticed
        yet) can never have its change silently overwritten on MongoDB.
        """
        ops = [
            UpdateOne(
                {
                    "product_id": c.product_id,
                    "stock": c.expected_stock,
                    f"{MARKER}.last": c.expected_last
                    if c.expected_last is not None
                    else {"$exists": False},
                },
                {"$set": {"stock": c.new_stock, MARKER: c.marker}},
            )
            for c in changes
        ]
        matched = 0
        for chunk in chunks(ops):
            matched += self.products.bulk_write(list(chunk), ordered=False).matched_count
        if matched != len(ops):
            raise ConcurrentWriteError(
                f"{len(ops) - matched} of {len(ops)} product(s) changed under this writer"
            )

    def seed(self, products: Mapping[int, int]) -> None:
        """Create or reset these products to the given stock; other products are untouched.

        A reset also drops stockflow's marker, so audits count from the new stock.
        """
        ops = [
            UpdateOne(
                {"product_id": pid}, {"$set": {"stock": stock}, "$unset": {MARKER: ""}}, upsert=True
            )
            for pid, stock in products.items()
        ]
        for chunk in chunks(ops):
            self.products.bulk_write(list(chunk))

    def list_products(self, limit: int = 100) -> list[Product]:
        cursor = self.products.find({}, {"_id": 0}).sort("product_id", ASCENDING).limit(limit)
        return list(cursor)
