"""The MongoDB stock store: products in the seed's plain schema (``product_id``, ``stock``).

:meth:`Inventory.write_changes` is the one place stock changes. stockflow adds one field of
its own to a product it changes, ``_stockflow`` (see ``planner``), and needs no migration:
products written by anyone in the plain schema work as they are, and so do products with a
marker of an earlier form (converted at their next write).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pymongo import ASCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from stockflow.config import Settings
from stockflow.errors import ConcurrentWriteError
from stockflow.ledger import CHUNK, chunks, side_by_side
from stockflow.planner import MARKER, ProductChange

Product = dict[str, Any]

DEMO_PRODUCTS: Mapping[int, int] = {101: 100, 102: 50, 103: 25, 104: 10, 105: 0}
"""The demo catalogue: the seed's product 101 with stock 100, and a few more."""


FEW = 32
"""Up to this many products are looked up one by one rather than with one ``$in`` query."""


def _version_filter(change: ProductChange) -> dict[str, Any]:
    """The marker the change was planned from: its version, or no marker at all."""
    if change.expected_version is None:
        return {MARKER: {"$exists": False}}
    name, value = change.expected_version
    return {f"{MARKER}.{name}": value}


class Inventory:
    """Product reads and stock changes against one collection."""

    def __init__(
        self, collection: Collection[Product], *, pool: ThreadPoolExecutor | None = None
    ) -> None:
        self.products = collection
        self.pool = pool
        """Runs independent commands side by side (None: one after the other)."""

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        client: MongoClient[Product],
        *,
        pool: ThreadPoolExecutor | None = None,
    ) -> Inventory:
        return cls(client[settings.database][settings.products_collection], pool=pool)

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
        """The documents of these products (None for a missing one), by product id.

        A few are looked up one by one (a filter FerretDB hands to its storage); more in one
        ``$in`` query (which FerretDB v1 answers by reading the whole collection).
        """
        wanted = list(dict.fromkeys(product_ids))
        found: dict[int, Product | None] = dict.fromkeys(wanted)
        if len(wanted) <= FEW:

            def fetch(pid: int) -> Product | None:
                return self.products.find_one({"product_id": pid})

            found.update(zip(wanted, side_by_side(self.pool, fetch, wanted), strict=True))
            return found
        for chunk in chunks(wanted, 500):
            for doc in self.products.find({"product_id": {"$in": list(chunk)}}):
                pid = doc.get("product_id")
                if isinstance(pid, int) and found.get(pid) is None:
                    found[pid] = doc
        return found

    def load_all(self, limit: int) -> list[Product] | None:
        """Every product, if there are at most ``limit`` of them (else None)."""
        if self.products.estimated_document_count() > limit:
            return None
        return [doc for doc in self.products.find({}) if isinstance(doc.get("product_id"), int)]

    def write_changes(self, changes: Sequence[ProductChange]) -> None:
        """Compare-and-set each product; ConcurrentWriteError if another writer got there first.

        Each change is conditional on the stock and marker version the plan was made from, so
        a second writer of the same product (another pipeline, a consumer that lost its
        partition but has not noticed yet, or anyone writing the plain schema directly) can
        never have its change silently overwritten: the loser plans again from what is
        stored. Documents are found by ``_id`` (an index lookup on every server); the update
        commands, small for FerretDB's sake, run side by side on the writer's pool.
        """
        ops = [
            UpdateOne(
                {"_id": c.doc_id, "stock": c.expected_stock, **_version_filter(c)},
                {"$set": {"stock": c.new_stock, MARKER: c.marker}},
            )
            for c in changes
        ]

        def write(chunk: Sequence[UpdateOne]) -> int:
            return self.products.bulk_write(list(chunk), ordered=False).matched_count

        matched = sum(side_by_side(self.pool, write, chunks(ops, self._chunk_size(len(ops)))))
        if matched != len(ops):
            raise ConcurrentWriteError(
                f"{len(ops) - matched} of {len(ops)} product(s) changed under this writer",
                refused=len(ops) - matched,
            )

    def _chunk_size(self, statements: int) -> int:
        """Spread a few statements over all the pool's threads; many, in commands of CHUNK."""
        if self.pool is None:
            return CHUNK
        threads = self.pool._max_workers
        return max(1, min(CHUNK, -(-statements // threads)))

    def current(self, doc_ids: Iterable[Any]) -> list[Product]:
        """Fetch these products by ``_id`` (index lookups, side by side on the pool)."""

        def fetch(doc_id: Any) -> Product | None:
            return self.products.find_one({"_id": doc_id})

        return [doc for doc in side_by_side(self.pool, fetch, doc_ids) if doc is not None]

    def seed(self, products: Mapping[int, int]) -> None:
        """Create or reset these products to the given stock; other products are untouched.

        A reset also drops stockflow's marker, so audits count from the new stock. Existing
        products are found with one read and reset by ``_id``; new ones are inserted in bulk.
        """
        existing = {
            pid: doc["_id"]
            for pid, doc in self.load(products).items()
            if doc is not None and "_id" in doc
        }
        resets = [
            UpdateOne({"_id": existing[pid]}, {"$set": {"stock": stock}, "$unset": {MARKER: ""}})
            for pid, stock in products.items()
            if pid in existing
        ]
        side_by_side(self.pool, lambda part: self.products.bulk_write(list(part)), chunks(resets))
        new = [
            {"product_id": pid, "stock": stock}
            for pid, stock in products.items()
            if pid not in existing
        ]
        for chunk in chunks(new, 1000):
            self.products.insert_many(list(chunk), ordered=False)

    def list_products(self, limit: int = 100) -> list[Product]:
        cursor = self.products.find({}, {"_id": 0}).sort("product_id", ASCENDING).limit(limit)
        return list(cursor)
