"""The pure core of applying a batch: which outcome each command gets and what to write.

No I/O here. Given the commands of one batch (in partition order), the products they touch
as MongoDB holds them, and which commands already own their id, :func:`plan_batch` decides
every outcome and the one compare-and-set change per product. It is deterministic, so a batch
replayed after a crash plans the same outcomes, and each product's ``_stockflow`` marker tells
it what the crashed attempt already wrote:

``_stockflow = {partition, first, last, before, steps, baseline, since}``: the changes written
since the last commit cover the commands at offsets ``first..last`` of ``partition`` of the
commands topic, starting from stock ``before``; ``steps`` maps each of those offsets to the
stock after it, so a replay can start at any of them (a re-fetch need not split batches where
the crashed attempt did). ``baseline`` is the stock stockflow found before the command at
offset ``since``: the audit counts changes from there.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stockflow.orders import Command, Order
from stockflow.outcomes import Outcome, Source

log = logging.getLogger(__name__)

MARKER = "_stockflow"


@dataclass(frozen=True, slots=True)
class Entry:
    """One command read from the commands topic."""

    position: Source
    """Where it is on the commands topic (unique: the identity of this delivery)."""
    source: Source
    """Where it was on the input topic."""
    command: Command


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome planned for one entry."""

    entry: Entry
    outcome: Outcome
    stock_after: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ProductChange:
    """A compare-and-set of one product: from (stock, marker last) to the new stock and marker."""

    product_id: int
    doc_id: Any
    """The product document's ``_id``: the compare-and-set finds the document by it."""
    expected_stock: Any
    expected_last: int | None
    new_stock: int
    marker: dict[str, Any]


@dataclass
class Plan:
    """Everything a batch must write, in order."""

    decisions: list[Decision] = field(default_factory=list)
    changes: list[ProductChange] = field(default_factory=list)


def owner_key(command: Command) -> tuple[str, int | str]:
    return (command.kind, command.id)


def _valid_stock(value: Any) -> int | None:
    """Stock as an int, accepting integral floats (JavaScript clients write doubles)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def plan_batch(
    entries: Sequence[Entry],
    products: Mapping[int, Mapping[str, Any] | None],
    owners: Mapping[tuple[str, int | str], Source],
) -> Plan:
    """Decide every entry's outcome and each product's single change.

    ``products`` maps every product id of the batch to its document (None: no such product).
    ``owners`` maps each (kind, id) of the batch to the commands-topic position that claimed
    it first; an entry at another position is a duplicate.
    """
    plan = Plan()
    by_product: dict[int, list[Entry]] = defaultdict(list)
    verdicts: dict[Source, Decision] = {}
    for entry in entries:
        owner = owners.get(owner_key(entry.command))
        if owner is not None and owner != entry.position:
            verdicts[entry.position] = Decision(
                entry, Outcome.DUPLICATE, reason=f"{entry.command.kind} id already used at {owner}"
            )
        else:
            by_product[entry.command.product_id].append(entry)

    for product_id, group in by_product.items():
        group.sort(key=lambda e: (e.position.partition, e.position.offset))
        doc = products.get(product_id)
        if doc is None:
            for entry in group:
                verdicts[entry.position] = Decision(entry, Outcome.UNKNOWN_PRODUCT)
            continue
        stock = _valid_stock(doc.get("stock"))
        if stock is None:
            reason = f"product {product_id} has an unusable stock value {doc.get('stock')!r}"
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
    partition = group[0].position.partition
    marker = doc.get(MARKER) if isinstance(doc.get(MARKER), Mapping) else None
    last = marker.get("last") if marker and marker.get("partition") == partition else None
    running = stock
    replayed = 0
    steps: dict[str, int] = {}
    first, before = group[0].position.offset, stock
    if marker is not None and last is not None and last >= group[0].position.offset:
        # A replay of commands whose change was already written (but not committed): decide
        # them again from the stock before the first of them, which the marker's steps give.
        steps = {str(k): int(v) for k, v in (marker.get("steps") or {}).items()}
        first, before = int(marker["first"]), int(marker["before"])
        earlier = [int(k) for k in steps if int(k) < group[0].position.offset]
        running = steps[str(max(earlier))] if earlier else before
        for entry in group:
            if entry.position.offset > last:
                break
            running = _decide(entry, running, verdicts)
            replayed += 1
        if group[replayed - 1].position.offset == last and running != stock:
            log.error(
                "product %s: replayed stock %s differs from stored %s", product_id, running, stock
            )
            running = stock
    fresh = group[replayed:]
    if not fresh:
        return
    if not replayed:
        first, before = fresh[0].position.offset, running
    start = running
    for entry in fresh:
        running = _decide(entry, running, verdicts)
        steps[str(entry.position.offset)] = running
    if running == start and marker is not None and last is not None:
        return  # nothing applied: no write needed, the marker stays valid
    new_marker: dict[str, Any] = {
        "partition": partition,
        "first": first,
        "last": fresh[-1].position.offset,
        "before": before,
        "steps": steps,
    }
    if marker and "baseline" in marker and "since" in marker:
        new_marker["baseline"] = int(marker["baseline"])
        new_marker["since"] = int(marker["since"])
    else:
        new_marker["baseline"] = stock
        new_marker["since"] = fresh[0].position.offset
    plan.changes.append(
        ProductChange(
            product_id,
            doc_id=doc.get("_id"),
            expected_stock=doc.get("stock"),
            expected_last=int(marker["last"]) if marker and "last" in marker else None,
            new_stock=running,
            marker=new_marker,
        )
    )


def _decide(entry: Entry, stock: int, verdicts: dict[Source, Decision]) -> int:
    command = entry.command
    if isinstance(command, Order) and stock < command.quantity:
        verdicts[entry.position] = Decision(entry, Outcome.INSUFFICIENT_STOCK, stock)
        return stock
    stock += command.delta
    verdicts[entry.position] = Decision(entry, Outcome.APPLIED, stock)
    return stock
