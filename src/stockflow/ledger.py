"""Outcome records in MongoDB: one document per order (``orders``) and per restock (``restocks``).

Two collections per kind, both keyed by the order's (or restock's) id as ``_id``, so they are
unique on it on MongoDB and FerretDB alike:

- ``<orders>_claims``: claiming an id is an insert, so the first delivery to insert wins and
  every later message with the same id is a duplicate (noted on the claim);
- ``<orders>``: the outcome record, inserted once the stock change is durable.

A claim without an outcome record is *pending*. Both steps are inserts, which FerretDB and
MongoDB take in bulk; updating each record in place would cost one statement per order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pymongo import ReplaceOne, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from stockflow.outcomes import Outcome, OutcomeEvent, Source
from stockflow.planner import Decision, Entry, owner_key

Doc = dict[str, Any]
T = TypeVar("T")
R = TypeVar("R")
PENDING = "pending"
CHUNK = 16
"""Statements per update command. FerretDB v1 holds a pooled connection per statement until the
command ends and deadlocks when the pool (50 by default, 180 as stockflow starts it, 100 with
SQLite) runs dry across all concurrent commands: keep update commands small."""
INSERT_CHUNK = 500
"""Documents per insert command (FerretDB inserts a batch in one statement)."""
DUPLICATE_KEY = 11000


def _src(source: Source) -> str:
    # ``topic[partition]@offset``: a string costs FerretDB less to store than an array.
    return str(source)


def _from_src(value: Any) -> Source | None:
    return Source.parse(value) if isinstance(value, str) else None


def duplicate_note(source: Source, source_id: str | None) -> str:
    """A duplicate's note on the original's claim: its input position, and the input topic's
    id after a ``#`` when known (a topic name has no ``#``)."""
    return f"{source}#{source_id}" if source_id else str(source)


def parse_duplicate_note(text: str) -> tuple[Source | None, str | None]:
    """The inverse of ``duplicate_note``: position and input topic id (None if absent)."""
    position, _, source_id = text.partition("#")
    return Source.parse(position), source_id or None


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def side_by_side(
    pool: ThreadPoolExecutor | None, fn: Callable[[T], R], items: Iterable[T]
) -> list[R]:
    """``fn`` over ``items``, on ``pool`` when there is one and more than one item."""
    todo = list(items)
    if pool is None or len(todo) < 2:
        return [fn(item) for item in todo]
    return list(pool.map(fn, todo))


def claims_name(records: str) -> str:
    """The claims collection beside a records collection."""
    return f"{records}_claims"


def insert_all(
    collection: Collection[Doc], docs: Sequence[Doc], pool: ThreadPoolExecutor | None = None
) -> set[Any]:
    """Insert ``docs`` (in chunks, side by side on ``pool``), skipping any whose ``_id``
    exists; returns the ids it skipped."""

    def insert(chunk: Sequence[Doc]) -> set[Any]:
        try:
            collection.insert_many(chunk, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            # Write-concern errors: the inserts were not confirmed durable, so nothing here
            # counts as done (``mongo.classify`` takes them as transient: wait and redo).
            if exc.details.get("writeConcernErrors") or any(
                err.get("code") != DUPLICATE_KEY for err in errors
            ):
                raise
            return {chunk[err["index"]]["_id"] for err in errors}
        return set()

    return set().union(*side_by_side(pool, insert, chunks(docs, INSERT_CHUNK)))


class Ledger:
    """The outcome records and claims of orders and restocks."""

    def __init__(
        self,
        database: Database[Doc],
        orders: str,
        restocks: str,
        *,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.records: dict[str, Collection[Doc]] = {
            "order": database[orders],
            "restock": database[restocks],
        }
        self.claims: dict[str, Collection[Doc]] = {
            "order": database[claims_name(orders)],
            "restock": database[claims_name(restocks)],
        }
        self.pool = pool

    def claim(self, entries: Sequence[Entry]) -> dict[tuple[str, int | str], Source]:
        """Claim each entry's id; returns who owns every id of the batch (a position).

        New ids are claimed by their entry; for ids already claimed the existing owner is
        returned, which makes a later copy a duplicate (or, after a crash, recognises the
        batch's own earlier claim).
        """
        owners: dict[tuple[str, int | str], Source] = {}
        for kind, collection in self.claims.items():
            first: dict[int | str, Entry] = {}
            for entry in entries:
                if entry.command.kind == kind:
                    first.setdefault(entry.command.id, entry)
            if not first:
                continue
            taken = insert_all(collection, [self._claim(e) for e in first.values()], self.pool)
            for ident, entry in first.items():
                owners[(kind, ident)] = entry.position

            # By _id one at a time: an index lookup each, whatever the collection's size.
            def owner_of(ident: Any, c: Collection[Doc] = collection) -> Doc | None:
                return c.find_one({"_id": ident}, {"position": 1})

            found = side_by_side(self.pool, owner_of, taken)
            for doc in found:
                if doc is None:
                    continue
                position = _from_src(doc.get("position"))
                if position is not None:
                    owners[(kind, doc["_id"])] = position
        return owners

    @staticmethod
    def _claim(entry: Entry) -> Doc:
        command = entry.command
        return {
            "_id": command.id,
            "source": _src(entry.source),
            "position": _src(entry.position),
            **({"sourceId": entry.source_id} if entry.source_id else {}),
        }

    @staticmethod
    def _record(decision: Decision, at: float) -> Doc:
        command = decision.entry.command
        field = "orderId" if command.kind == "order" else "restockId"
        return {
            "_id": command.id,
            field: command.id,
            "productId": command.product_id,
            "quantity": command.quantity,
            "status": decision.outcome.value,
            "stockAfter": decision.stock_after,
            **({"reason": decision.reason} if decision.reason else {}),
            "source": _src(decision.entry.source),
            "position": _src(decision.entry.position),
            # The commands topic's incarnation: the audit tells a recreated topic's records
            # apart from its predecessor's at the same positions.
            **({"topicId": decision.entry.topic_id} if decision.entry.topic_id else {}),
            # The input topic's incarnation: the audit's message accounting, likewise.
            **({"sourceId": decision.entry.source_id} if decision.entry.source_id else {}),
            "at": at,
        }

    def finish(self, decisions: Sequence[Decision], at: float) -> None:
        """Record each owner's outcome, and note duplicates on the original's claim."""
        for kind in self.records:
            mine = [d for d in decisions if d.entry.command.kind == kind]
            owned = [self._record(d, at) for d in mine if d.outcome is not Outcome.DUPLICATE]
            # Already there after a crash between this and the Kafka commit: the crashed
            # attempt's record, which this attempt's replaces (only on replays). They differ
            # when a command was decided without a write and another pipeline changed the
            # product since: the record must say what this attempt publishes.
            skipped = insert_all(self.records[kind], owned, self.pool)
            again = [
                ReplaceOne({"_id": r["_id"], "position": r["position"]}, r)
                for r in owned
                if r["_id"] in skipped
            ]
            for chunk in chunks(again):
                self.records[kind].bulk_write(list(chunk), ordered=False)
            notes = [
                UpdateOne(
                    {"_id": d.entry.command.id},
                    # A string: FerretDB v1 stores no arrays inside arrays.
                    {
                        "$addToSet": {
                            "duplicates": duplicate_note(d.entry.source, d.entry.source_id)
                        }
                    },
                )
                for d in mine
                if d.outcome is Outcome.DUPLICATE
            ]
            for chunk in chunks(notes):
                self.claims[kind].bulk_write(list(chunk), ordered=False)

    def archive(self, kind: str, ids: Sequence[int | str], *, product_id: int) -> int:
        """Free these ids of ``product_id`` for reuse, keeping their records under a new id.

        The demo reuses the seed's order ids; archiving (not deleting) keeps every earlier
        message accounted for in audits.
        """
        moved = 0
        suffix = f"@archived-{time.time():.6f}"
        for ident in ids:
            record = self.records[kind].find_one({"_id": ident})
            if record is not None and record.get("productId") != product_id:
                continue
            for collection, doc in (
                (self.records[kind], record),
                (self.claims[kind], self.claims[kind].find_one({"_id": ident})),
            ):
                if doc is None:
                    continue
                collection.insert_one({**doc, "_id": f"{ident}{suffix}", "archived": True})
                collection.delete_one({"_id": ident})
            moved += record is not None
        return moved

    def find(self, kind: str, ident: int | str) -> Doc | None:
        """The outcome record (status ``pending`` while only claimed) with its duplicates."""
        claim = self.claims[kind].find_one({"_id": ident})
        record = self.records[kind].find_one({"_id": ident})
        if record is None and claim is None:
            return None
        if record is None:
            assert claim is not None
            field = "orderId" if kind == "order" else "restockId"
            record = {**claim, field: ident, "status": PENDING}
        if claim and claim.get("duplicates"):
            record["duplicates"] = claim["duplicates"]
        return record

    def ensure_indexes(self) -> None:
        """Nothing beyond ``_id``: every lookup is by id (and each index slows inserts)."""


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
