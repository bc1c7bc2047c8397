"""The pure core of applying a batch: which outcome each command gets and what to write.

No I/O here. Given the commands of one batch (in partition order), the products they touch
as MongoDB holds them, and which commands already own their id, :func:`plan_batch` decides
every outcome and the one compare-and-set change per product. It is deterministic, so a batch
replayed after a crash plans the same outcomes, and each product's ``_stockflow`` marker tells
it what the crashed attempt already wrote::

    _stockflow = {v, baseline, topics: [{topic, id, partition, last, since, steps}, ...]}

``topics`` has one entry per commands topic that wrote the product (at most
:data:`MAX_TOPICS`, the most recently written last): the topic's name and Kafka's id of it
(``id``; a topic deleted and recreated under the same name has a new one, so it is another
topic), and the product's partition of it. ``steps`` holds the commands of that partition
written since its last commit, up to offset ``last``: offset -> the stock after the command
if it was applied, or ``-1 - stock`` if it was an order refused at that stock. A command of
the batch at an offset up to ``last`` of *its own* topic's entry was written already: its
decision is read back from its step, never taken again from stock (another pipeline may have
changed the stock since). A command whose outcome is recorded (its id's owner, read again
after a rewind) gets the recorded outcome: records are written only once the product's change
is durable. Every other command is decided from the stored stock.

``v`` counts the writes (the compare-and-set checks it, and the cache orders entries by it);
``baseline`` is the stock the audit counts from: stock = baseline + the changes recorded for
each entry's topic from offset ``since`` on.

A marker written before markers named their topic (``{partition, first, last, before,
steps, baseline, since}``) belongs to no topic: its product is decided from the stored stock
and gets a marker of this form at its next write.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stockflow.orders import Command, Order
from stockflow.outcomes import Outcome, Source

MARKER = "_stockflow"
MAX_TOPICS = 8
"""Commands topics a marker remembers; writing from a further one forgets the least recent."""

RECORDED = frozenset({Outcome.APPLIED, Outcome.INSUFFICIENT_STOCK, Outcome.UNKNOWN_PRODUCT})
"""The outcomes an owner's record can hold (a dead letter and a duplicate get none)."""

Topic = dict[str, Any]
"""One entry of a marker's ``topics``."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One command read from the commands topic."""

    position: Source
    """Where it is on the commands topic (unique: the identity of this delivery)."""
    source: Source
    """Where it was on the input topic."""
    command: Command
    topic_id: str | None = None
    """Kafka's id of the commands topic (None: unknown, the topic's name alone identifies it)."""
    source_id: str | None = None
    """Kafka's id of the input topic, as the router recorded it (None: not recorded)."""


@dataclass(frozen=True, slots=True)
class Owner:
    """The delivery that claimed an id first: its position and its commands topic's id."""

    position: Source
    topic_id: str | None = None
    """None: not known (a claim made before claims named their topic's id, or no ids)."""
    outcome: Outcome | None = None
    """The outcome recorded for it (None: no record yet). A delivery read again once its
    record exists is told this decision, as it is: the record is written only after the
    product's change is durable, so deciding again from the stock could only contradict it."""
    stock_after: int | None = None
    reason: str | None = None

    def owns(self, entry: Entry) -> bool:
        """Whether ``entry`` is this delivery (again): the same position of the same topic.

        A recreated topic repeats names, partitions and offsets, so its commands are told
        from the deleted one's by Kafka's topic id, wherever both sides know it.
        """
        if entry.position != self.position:
            return False
        return self.topic_id is None or entry.topic_id is None or entry.topic_id == self.topic_id


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome planned for one entry."""

    entry: Entry
    outcome: Outcome
    stock_after: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ProductChange:
    """A compare-and-set of one product: from (stock, marker version) to new stock and marker."""

    product_id: int
    doc_id: Any
    """The product document's ``_id``: the compare-and-set finds the document by it."""
    expected_stock: Any
    expected_version: tuple[str, Any] | None
    """The marker field and value the product was planned from: ``("v", n)``, ``("last",
    offset)`` for a marker of the old form, None for a product without a marker."""
    new_stock: int
    marker: dict[str, Any]


@dataclass
class Plan:
    """Everything a batch must write, in order."""

    decisions: list[Decision] = field(default_factory=list)
    changes: list[ProductChange] = field(default_factory=list)


def owner_key(command: Command) -> tuple[str, int | str]:
    return (command.kind, command.id)


MAX_STOCK = 2**62
"""The largest stock stockflow works with: far below MongoDB's 64-bit integers, so that a
batch's restocks on top of it still fit in one (a larger number would not even encode)."""
MAX_FLOAT_STOCK = 2**53
"""Doubles (JavaScript clients write them) count single units only below this."""


def _valid_stock(value: Any) -> int | None:
    """Stock as a plain int; None for anything that is not a whole, countable, storable
    number of units (strings, booleans, Decimal128, NaN, infinities, huge numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value) if 0 <= value <= MAX_STOCK else None
    if isinstance(value, float) and value.is_integer() and 0 <= value < MAX_FLOAT_STOCK:
        return int(value)  # -0.0 is 0
    return None


def _shown(value: Any, limit: int = 60) -> str:
    """A stored value as a reason quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def topic_entries(marker: Any) -> list[Topic] | None:
    """The ``topics`` of a marker of the current form (entries that are not well formed are
    left out); None for no marker or one of the old form."""
    if not isinstance(marker, Mapping) or not isinstance(marker.get("topics"), list):
        return None
    entries = []
    for item in marker["topics"]:
        if (
            isinstance(item, Mapping)
            and isinstance(item.get("topic"), str)
            and isinstance(item.get("id"), str | None)
            and all(_int(item.get(k)) is not None for k in ("partition", "last", "since"))
            and isinstance(item.get("steps"), Mapping)
        ):
            entries.append(dict(item))
    return entries


def marker_version(product: Mapping[str, Any]) -> int:
    """How many times stockflow wrote the product, as its marker says; -1 before any.

    A marker of the old form counts the offset of its last change instead, which is what
    the next write continues from, so the version only ever grows.
    """
    marker = product.get(MARKER)
    if not isinstance(marker, Mapping):
        return -1
    version = _int(marker.get("v") if "topics" in marker else marker.get("last"))
    return -1 if version is None else version


def _expected_version(marker: Any) -> tuple[str, Any] | None:
    if not isinstance(marker, Mapping):
        return None
    if "topics" in marker:
        return ("v", marker.get("v"))
    return ("last", marker.get("last"))


def _is_writer(item: Topic, head: Entry) -> bool:
    """Whether a marker entry is the one of the topic (and partition) ``head`` came from."""
    if item["topic"] != head.position.topic or item["partition"] != head.position.partition:
        return False
    return head.topic_id is None or item.get("id") == head.topic_id


def _step(decision: Decision) -> int:
    stock = decision.stock_after or 0
    return stock if decision.outcome is Outcome.APPLIED else -1 - stock


def _replayed(entry: Entry, step: int) -> Decision:
    """The decision a written step records."""
    if step >= 0:
        return Decision(entry, Outcome.APPLIED, step)
    return Decision(entry, Outcome.INSUFFICIENT_STOCK, -1 - step)


def plan_batch(
    entries: Sequence[Entry],
    products: Mapping[int, Mapping[str, Any] | None],
    owners: Mapping[tuple[str, int | str], Owner],
) -> Plan:
    """Decide every entry's outcome and each product's single change.

    ``products`` maps every product id of the batch to its document (None: no such product).
    ``owners`` maps each (kind, id) of the batch to the delivery that claimed it first; any
    other delivery (another position, or the same position of another incarnation of the
    topic) is a duplicate. An owner whose outcome is recorded already gets that outcome again.
    """
    plan = Plan()
    by_product: dict[int, list[Entry]] = defaultdict(list)
    verdicts: dict[Source, Decision] = {}
    for entry in entries:
        owner = owners.get(owner_key(entry.command))
        if owner is not None and not owner.owns(entry):
            reason = f"{entry.command.kind} id already used at {owner.position}"
            if owner.position == entry.position:
                reason += f" of an earlier incarnation of the topic (id {owner.topic_id})"
            verdicts[entry.position] = Decision(entry, Outcome.DUPLICATE, reason=reason)
        elif owner is not None and owner.outcome in RECORDED:
            assert owner.outcome is not None
            verdicts[entry.position] = Decision(
                entry, owner.outcome, owner.stock_after, owner.reason
            )
        else:
            by_product[entry.command.product_id].append(entry)

    for product_id, group in by_product.items():
        group.sort(key=lambda e: (e.position.topic, e.position.partition, e.position.offset))
        doc = products.get(product_id)
        if doc is None:
            for entry in group:
                verdicts[entry.position] = Decision(entry, Outcome.UNKNOWN_PRODUCT)
            continue
        stock = _valid_stock(doc.get("stock"))
        if stock is None:
            reason = f"product {product_id} has an unusable stock value {_shown(doc.get('stock'))}"
            for entry in group:
                verdicts[entry.position] = Decision(entry, Outcome.DEAD_LETTERED, reason=reason)
            continue
        _plan_product(product_id, group, doc, stock, plan, verdicts)

    plan.decisions = [verdicts[e.position] for e in entries]
    return plan


def _plan_product(
    product_id: int,
    group: list[Entry],
    doc: Mapping[str, Any],
    stock: int,
    plan: Plan,
    verdicts: dict[Source, Decision],
) -> None:
    """Plan one product's commands: each partition's in turn (each has its own marker entry
    and steps), the next from the stock and marker the previous one leaves; one change."""
    parts: dict[tuple[str, int], list[Entry]] = defaultdict(list)
    for entry in group:
        parts[(entry.position.topic, entry.position.partition)].append(entry)
    current: Mapping[str, Any] = doc
    changed = False
    for part in parts.values():
        after = _plan_part(part, current, stock, verdicts)
        if after is not None:
            stock, marker = after
            current, changed = {**current, "stock": stock, MARKER: marker}, True
    if changed:
        plan.changes.append(
            ProductChange(
                product_id,
                doc_id=doc.get("_id"),
                expected_stock=doc.get("stock"),
                expected_version=_expected_version(doc.get(MARKER)),
                new_stock=stock,
                marker={**current[MARKER], "v": marker_version(doc) + 1},
            )
        )


def _plan_part(
    group: list[Entry], doc: Mapping[str, Any], stock: int, verdicts: dict[Source, Decision]
) -> tuple[int, dict[str, Any]] | None:
    """Plan one product's commands of one partition: the stock and marker after them, or
    None if they need no write."""
    head = group[0]
    marker = doc.get(MARKER)
    topics = topic_entries(marker)
    mine = next((item for item in topics or [] if _is_writer(item, head)), None)
    steps: dict[str, int] = {}
    replayed = 0
    if mine is not None and head.position.offset <= mine["last"]:
        # Commands this topic already wrote (but did not commit): their decisions are in the
        # steps. The stored stock may have moved on since (another pipeline), so it is not
        # consulted for them.
        steps = {str(k): int(v) for k, v in mine["steps"].items()}
        probe = stock
        for entry in group:
            if entry.position.offset > mine["last"]:
                break
            step = steps.get(str(entry.position.offset))
            if step is None:
                # Before the marker's range, and without a record (a recorded one never gets
                # here): tell it from the stock without changing anything.
                probe = _decide(entry, probe, verdicts)
            else:
                verdicts[entry.position] = _replayed(entry, step)
            replayed += 1
    fresh = group[replayed:]
    if not fresh:
        return None
    running = stock
    applied = False
    for entry in fresh:
        running = _decide(entry, running, verdicts)
        decision = verdicts[entry.position]
        applied = applied or decision.outcome is Outcome.APPLIED
        steps[str(entry.position.offset)] = _step(decision)
    if not applied and topics is not None:
        # Nothing applied: no write needed. Once recorded, these decisions are told again as
        # recorded; a replay before the records (nothing was published) decides them again
        # from the stored stock, which another pipeline may have changed meanwhile.
        return None
    return running, _next_marker(doc, topics, mine, head, fresh, steps, stock)


def _next_marker(
    doc: Mapping[str, Any],
    topics: list[Topic] | None,
    mine: Topic | None,
    head: Entry,
    fresh: list[Entry],
    steps: dict[str, int],
    stock: int,
) -> dict[str, Any]:
    """The marker after this write: the writer's entry updated (last), the others kept.

    Entries of the writer's topic name that are not the writer's (a deleted incarnation of
    the topic) and the least recently written beyond :data:`MAX_TOPICS` are forgotten; the
    audit then counts from the stock stored now (every remembered topic from after its
    ``last``), since the changes of a forgotten topic are no longer told apart.
    """
    name = head.position.topic
    others = [
        item
        for item in topics or []
        if item is not mine
        and not (item["topic"] == name and item["partition"] == head.position.partition)
    ]
    forgot = topics is None or len(others) + (mine is not None) < len(topics)
    if len(others) >= MAX_TOPICS:
        others, forgot = others[len(others) - MAX_TOPICS + 1 :], True
    marker = doc.get(MARKER)
    baseline = _int(marker.get("baseline")) if isinstance(marker, Mapping) else None
    since = fresh[0].position.offset if mine is None else mine["since"]
    if forgot or baseline is None:
        baseline, since = stock, fresh[0].position.offset
        others = [{**item, "since": item["last"] + 1} for item in others]
    writer: Topic = {
        "topic": name,
        "id": head.topic_id,
        "partition": head.position.partition,
        "last": fresh[-1].position.offset,
        "since": since,
        "steps": steps,
    }
    return {"v": marker_version(doc) + 1, "baseline": baseline, "topics": [*others, writer]}


def _decide(entry: Entry, stock: int, verdicts: dict[Source, Decision]) -> int:
    command = entry.command
    if isinstance(command, Order) and stock < command.quantity:
        verdicts[entry.position] = Decision(entry, Outcome.INSUFFICIENT_STOCK, stock)
        return stock
    stock += command.delta
    verdicts[entry.position] = Decision(entry, Outcome.APPLIED, stock)
    return stock
