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

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError

from stockflow.errors import ConcurrentWriteError
from stockflow.outcomes import Outcome, OutcomeEvent, Source
from stockflow.planner import Decision, Entry, Owner, owner_key

Doc = dict[str, Any]
T = TypeVar("T")
R = TypeVar("R")
PENDING = "pending"
CHUNK = 16
"""Statements per update command. Stock FerretDB v1 holds a pooled connection per statement until
the command ends and deadlocks when the pool (50 by default, 100 with SQLite) runs dry across
all concurrent commands: keep update commands small. (The local build is patched to hold one
at a time, ``POOL_PATCHES``; a user's own FerretDB may not be.)"""
INSERT_CHUNK = 500
"""Documents per insert command (FerretDB inserts a batch in one statement)."""
DUPLICATE_KEY = 11000
CLAIM_ROUNDS = 3
"""Attempts at claiming an id whose claim vanishes in between (released by another applier)."""


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


def _owner(claim: Doc, position: Source) -> Owner:
    topic_id = claim.get("topicId")
    return Owner(position, topic_id if isinstance(topic_id, str) else None)


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
        self.database = database
        self.records: dict[str, Collection[Doc]] = {
            "order": database[orders],
            "restock": database[restocks],
        }
        self.claims: dict[str, Collection[Doc]] = {
            "order": database[claims_name(orders)],
            "restock": database[claims_name(restocks)],
        }
        self.pool = pool

    def claim(self, entries: Sequence[Entry]) -> dict[tuple[str, int | str], Owner]:
        """Claim each entry's id; returns who owns every id of the batch (a position, and the
        commands topic's id: a recreated topic repeats positions).

        New ids are claimed by their entry; for ids already claimed the existing owner is
        returned, which makes a later copy a duplicate (or, after a crash, recognises the
        batch's own earlier claim). An id whose claim vanished between the two steps (its
        owner was dead-lettered and released it) is claimed again.
        """
        owners: dict[tuple[str, int | str], Owner] = {}
        for kind, collection in self.claims.items():
            first: dict[int | str, Entry] = {}
            for entry in entries:
                if entry.command.kind == kind:
                    first.setdefault(entry.command.id, entry)
            for ident, entry in first.items():
                owners[(kind, ident)] = Owner(entry.position, entry.topic_id)

            # By _id one at a time: an index lookup each, whatever the collection's size.
            def owner_of(ident: Any, c: Collection[Doc] = collection) -> Doc | None:
                return c.find_one({"_id": ident}, {"position": 1, "topicId": 1})

            todo = list(first.values())
            again: list[Entry] = []  # claimed before by this very delivery (a replay)
            for _ in range(CLAIM_ROUNDS):
                if not todo:
                    break
                taken = list(insert_all(collection, [self._claim(e) for e in todo], self.pool))
                found = side_by_side(self.pool, owner_of, taken)
                todo = [first[ident] for ident, doc in zip(taken, found, strict=True) if not doc]
                for doc in found:
                    position = _from_src(doc.get("position")) if doc else None
                    if doc and position is not None:
                        owner = owners[(kind, doc["_id"])] = _owner(doc, position)
                        if owner.owns(first[doc["_id"]]):
                            again.append(first[doc["_id"]])
            if todo:
                raise ConcurrentWriteError(f"claims of {len(todo)} id(s) kept vanishing")
            for entry, told in zip(again, self._recorded(kind, again), strict=True):
                if told is not None:
                    owners[(kind, entry.command.id)] = told
        return owners

    def _recorded(self, kind: str, entries: Sequence[Entry]) -> list[Owner | None]:
        """Each entry as an owner with its recorded outcome (None: not recorded yet)."""
        fields = {"status": 1, "stockAfter": 1, "reason": 1, "position": 1, "topicId": 1}

        def record_of(entry: Entry) -> Owner | None:
            record = self.records[kind].find_one({"_id": entry.command.id}, fields)
            position = _from_src(record.get("position")) if record else None
            if record is None or position is None or not _owner(record, position).owns(entry):
                return None
            try:
                outcome = Outcome(str(record.get("status")))
            except ValueError:
                return None
            stock = record.get("stockAfter")
            reason = record.get("reason")
            return Owner(
                entry.position,
                entry.topic_id,
                outcome,
                stock if isinstance(stock, int) and not isinstance(stock, bool) else None,
                reason if isinstance(reason, str) else None,
            )

        return side_by_side(self.pool, record_of, entries)

    def release(self, entries: Sequence[Entry]) -> None:
        """Free the ids these entries own (they were dead-lettered), so that a replay of one
        is decided afresh; the claim, with any duplicates noted on it, is kept under another
        ``_id`` (``<id>@released@<position>``, marked ``released``) for the audit and history.
        """
        for entry in entries:
            kind, ident = entry.command.kind, entry.command.id
            mine = {"_id": ident, "position": _src(entry.position)}
            claim = self.claims[kind].find_one(mine)
            if claim is None or not _owner(claim, entry.position).owns(entry):
                # Released already (a redone batch), or owned by another entry (maybe at this
                # position of a deleted incarnation of the topic).
                continue
            kept = {
                **claim,
                "_id": f"{ident}@released@{entry.position}",
                "claimOf": ident,
                "released": True,
            }
            insert_all(self.claims[kind], [kept])
            self.claims[kind].delete_one(mine)

    @staticmethod
    def _claim(entry: Entry) -> Doc:
        command = entry.command
        return {
            "_id": command.id,
            "source": _src(entry.source),
            "position": _src(entry.position),
            # The commands topic's incarnation: a recreated topic repeats positions, and a
            # copy sent to it again must stay a duplicate.
            **({"topicId": entry.topic_id} if entry.topic_id else {}),
            # The input topic's incarnation: the audit's message accounting, likewise.
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
            **({"sourceId": decision.entry.source_id} if decision.entry.source_id else {}),
            "at": at,
        }

    def finish(self, decisions: Sequence[Decision], at: float) -> None:
        """Record each owner's outcome, and note duplicates on the original's claim.

        A dead-lettered owner gets no record: its dead letter is its outcome, and its claim is
        released (after the duplicates are noted on it) so that its replay is not a duplicate.
        """
        for kind in self.records:
            mine = [d for d in decisions if d.entry.command.kind == kind]
            owned = [
                self._record(d, at)
                for d in mine
                if d.outcome not in (Outcome.DUPLICATE, Outcome.DEAD_LETTERED)
            ]
            # Already there after a crash between this and the Kafka commit: the crashed
            # attempt's record, kept as it is. The planner told that recorded decision
            # again (``Ledger.claim`` hands it over), so the two agree.
            insert_all(self.records[kind], owned, self.pool)
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
        self.release([d.entry for d in decisions if d.outcome is Outcome.DEAD_LETTERED])

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
        order_id=command.id if command.kind == "order" else None,
        restock_id=command.id if command.kind == "restock" else None,
        product_id=command.product_id,
        quantity=command.quantity,
        status=decision.outcome,
        stock_after=decision.stock_after,
        reason=decision.reason,
        source=decision.entry.source,
        at=at,
    )


__all__ = ["Ledger", "owner_key", "to_event"]
