"""Outcome records in MongoDB: one document per order (``orders``) and per restock (``restocks``).

A record's ``_id`` is the order's (or restock's) id, so the collection is unique on it on
MongoDB and FerretDB alike. Claiming an id is an insert: the first delivery to insert wins,
and every later message with the same id is a duplicate. A record starts ``pending``, is
finished once the stock change is durable, and lists the input positions of its duplicates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from stockflow.outcomes import Outcome, OutcomeEvent, Source
from stockflow.planner import Decision, Entry, owner_key

Doc = dict[str, Any]
PENDING = "pending"
CHUNK = 16
"""Statements per write command. FerretDB v1 holds a pooled connection per statement until the
command ends and deadlocks when the pool (50 by default, 180 as stockflow starts it, 100 with
SQLite) runs dry across all concurrent commands: keep commands small."""


def _src(source: Source) -> list[Any]:
    return [source.topic, source.partition, source.offset]


def _from_src(value: Any) -> Source | None:
    if isinstance(value, list) and len(value) == 3:
        return Source(str(value[0]), int(value[1]), int(value[2]))
    return None


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Ledger:
    """The ``orders`` and ``restocks`` collections."""

    def __init__(self, database: Database[Doc], orders: str, restocks: str) -> None:
        self.collections: dict[str, Collection[Doc]] = {
            "order": database[orders],
            "restock": database[restocks],
        }

    def claim(self, entries: Sequence[Entry]) -> dict[tuple[str, int | str], Source]:
        """Claim each entry's id; returns who owns every id of the batch (a position).

        New ids are inserted as pending records owned by their entry; for ids already
        claimed the existing owner is returned, which makes a later copy a duplicate.
        """
        owners: dict[tuple[str, int | str], Source] = {}
        for kind, collection in self.collections.items():
            mine = [e for e in entries if e.command.kind == kind]
            if not mine:
                continue
            first: dict[int | str, Entry] = {}
            for entry in mine:
                first.setdefault(entry.command.id, entry)
            docs = [self._pending(e) for e in first.values()]
            taken: set[int | str] = set()
            for chunk in chunks(docs):
                try:
                    collection.insert_many(chunk, ordered=False)
                except BulkWriteError as exc:
                    errors = exc.details.get("writeErrors", [])
                    if any(err.get("code") != 11000 for err in errors):
                        raise
                    taken.update(chunk[err["index"]]["_id"] for err in errors)
            for ident, entry in first.items():
                owners[(kind, ident)] = entry.position
            if taken:
                for doc in collection.find({"_id": {"$in": list(taken)}}, {"position": 1}):
                    position = _from_src(doc.get("position"))
                    if position is not None:
                        owners[(kind, doc["_id"])] = position
        return owners

    @staticmethod
    def _pending(entry: Entry) -> Doc:
        command = entry.command
        field = "orderId" if command.kind == "order" else "restockId"
        return {
            "_id": command.id,
            field: command.id,
            "productId": command.product_id,
            "quantity": command.quantity,
            "status": PENDING,
            "source": _src(entry.source),
            "position": _src(entry.position),
            "at": time.time(),
        }

    def finish(self, decisions: Sequence[Decision], at: float) -> None:
        """Write each owner's final outcome, and note duplicates on the original's record."""
        for kind, collection in self.collections.items():
            ops: list[UpdateOne] = []
            for d in decisions:
                command = d.entry.command
                if command.kind != kind:
                    continue
                if d.outcome is Outcome.DUPLICATE:
                    ops.append(
                        UpdateOne(
                            {"_id": command.id},
                            # A string: FerretDB v1 stores no arrays inside arrays.
                            {"$addToSet": {"duplicates": str(d.entry.source)}},
                        )
                    )
                    continue
                ops.append(
                    UpdateOne(
                        {"_id": command.id, "position": _src(d.entry.position)},
                        {
                            "$set": {
                                "status": d.outcome.value,
                                "stockAfter": d.stock_after,
                                "reason": d.reason,
                                "at": at,
                            }
                        },
                    )
                )
            for chunk in chunks(ops):
                collection.bulk_write(list(chunk), ordered=False)

    def archive(self, kind: str, ids: Sequence[int | str], *, product_id: int) -> int:
        """Free these ids of ``product_id`` for reuse, keeping their records under a new id.

        The demo reuses the seed's order ids; archiving (not deleting) keeps every earlier
        message accounted for in audits.
        """
        collection = self.collections[kind]
        moved = 0
        for doc in collection.find({"_id": {"$in": list(ids)}, "productId": product_id}):
            original = doc["_id"]
            doc["_id"] = f"{original}@archived-{time.time():.6f}"
            doc["archived"] = True
            collection.insert_one(doc)
            collection.delete_one({"_id": original})
            moved += 1
        return moved

    def find(self, kind: str, ident: int | str) -> Doc | None:
        return self.collections[kind].find_one({"_id": ident})

    def ensure_indexes(self) -> None:
        for collection in self.collections.values():
            collection.create_index("productId")


def to_event(decision: Decision, at: float) -> OutcomeEvent:
    command = decision.entry.command
    return OutcomeEvent(
        kind=command.kind,
        id=command.id,
        product_id=command.product_id,
        quantity=command.quantity,
        status=decision.outcome,
        stock_after=decision.stock_after,
        reason=decision.reason,
        source=decision.entry.source,
        at=at,
    )


__all__ = ["Ledger", "owner_key", "to_event"]
