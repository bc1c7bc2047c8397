"""The batch planner: outcomes, one compare-and-set per product, and replay after a crash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockflow.orders import Order, Restock
from stockflow.outcomes import Outcome, Source
from stockflow.planner import MARKER, Entry, Plan, ProductChange, plan_batch

Owners = Mapping[tuple[str, int | str], Source]
Products = Mapping[int, Mapping[str, Any] | None]


def order(offset: int, product: int, qty: int, oid: int | str | None = None) -> Entry:
    command = Order(offset if oid is None else oid, product, qty)
    return Entry(Source("cmds", 0, offset), Source("in", 0, offset), command)


def restock(offset: int, product: int, qty: int, rid: int | str | None = None) -> Entry:
    command = Restock(offset if rid is None else rid, product, qty)
    return Entry(Source("cmds", 0, offset), Source("in", 0, offset), command)


def plan(entries: Sequence[Entry], products: Products, owners: Owners | None = None) -> Plan:
    return plan_batch(entries, products, owners or {})


def verdicts(p: Plan) -> list[tuple[Source, Outcome, int | None]]:
    return [(d.entry.position, d.outcome, d.stock_after) for d in p.decisions]


def written(doc: Mapping[str, Any], change: ProductChange) -> dict[str, Any]:
    """The product document after the change's compare-and-set succeeded."""
    assert doc.get("stock") == change.expected_stock
    return {**doc, "stock": change.new_stock, MARKER: dict(change.marker)}


def test_orders_and_restocks_run_in_offset_order_against_the_document_stock() -> None:
    entries = [order(12, 1, 4), restock(11, 1, 5), order(10, 1, 3), order(13, 1, 9)]
    result = plan(entries, {1: {"product_id": 1, "stock": 5}})
    assert verdicts(result) == [  # decisions keep the batch's order, computed in offset order
        (Source("cmds", 0, 12), Outcome.APPLIED, 3),
        (Source("cmds", 0, 11), Outcome.APPLIED, 7),
        (Source("cmds", 0, 10), Outcome.APPLIED, 2),
        (Source("cmds", 0, 13), Outcome.INSUFFICIENT_STOCK, 3),
    ]
    marker = {
        "partition": 0,
        "first": 10,
        "last": 13,
        "before": 5,
        "steps": {"10": 2, "11": 7, "12": 3, "13": 3},  # the stock after each command
        "baseline": 5,
        "since": 10,
    }
    assert result.changes == [ProductChange(1, None, 5, None, 3, marker)]


def test_one_change_per_product_each_from_its_own_stock() -> None:
    entries = [order(0, 1, 2), order(1, 2, 8), restock(2, 2, 1), order(3, 1, 1)]
    result = plan(entries, {1: {"stock": 10}, 2: {"stock": 7}})
    assert [d.outcome for d in result.decisions] == [
        Outcome.APPLIED,
        Outcome.INSUFFICIENT_STOCK,
        Outcome.APPLIED,
        Outcome.APPLIED,
    ]
    changes = {c.product_id: c for c in result.changes}
    assert len(result.changes) == 2
    assert (changes[1].expected_stock, changes[1].new_stock) == (10, 7)
    assert (changes[1].marker["first"], changes[1].marker["last"]) == (0, 3)
    assert (changes[2].expected_stock, changes[2].new_stock) == (7, 8)
    assert (changes[2].marker["first"], changes[2].marker["last"]) == (1, 2)


def test_an_existing_marker_gives_expected_last_and_carries_baseline_and_since() -> None:
    old = {"partition": 0, "first": 3, "last": 4, "before": 9, "baseline": 7, "since": 0}
    result = plan([order(5, 1, 2), restock(6, 1, 1)], {1: {"stock": 8, MARKER: old}})
    marker = {
        "partition": 0,
        "first": 5,  # not a replay: the marker starts over at this batch
        "last": 6,
        "before": 8,
        "steps": {"5": 6, "6": 7},
        "baseline": 7,
        "since": 0,
    }
    assert result.changes == [ProductChange(1, None, 8, 4, 7, marker)]


def test_nothing_applied_writes_only_when_there_is_no_marker_yet() -> None:
    old = {"partition": 0, "first": 0, "last": 0, "before": 3, "baseline": 3, "since": 0}
    with_marker = plan([order(1, 1, 5)], {1: {"stock": 2, MARKER: old}})
    assert verdicts(with_marker) == [(Source("cmds", 0, 1), Outcome.INSUFFICIENT_STOCK, 2)]
    assert with_marker.changes == []
    without = plan([order(1, 1, 5)], {1: {"stock": 2}})
    assert [(c.new_stock, c.expected_last, c.marker["first"]) for c in without.changes] == [
        (2, None, 1)
    ]


def test_unknown_product_is_rejected_without_a_change() -> None:
    result = plan([order(0, 9, 1), restock(1, 9, 1), order(2, 1, 1)], {9: None, 1: {"stock": 1}})
    assert [d.outcome for d in result.decisions[:2]] == [Outcome.UNKNOWN_PRODUCT] * 2
    assert all(d.stock_after is None for d in result.decisions[:2])
    assert [c.product_id for c in result.changes] == [1]


@pytest.mark.parametrize("stock", ["10", -1, 1.5, True, None, float("nan"), {"$gt": 0}])
def test_unusable_stock_dead_letters_the_products_commands(stock: Any) -> None:
    result = plan([order(0, 1, 1), restock(1, 1, 2)], {1: {"stock": stock}})
    assert [d.outcome for d in result.decisions] == [Outcome.DEAD_LETTERED] * 2
    assert all(d.reason and "unusable stock" in d.reason for d in result.decisions)
    assert result.changes == []


def test_an_integral_float_stock_is_accepted() -> None:
    result = plan([order(0, 1, 1)], {1: {"stock": 100.0}})
    assert verdicts(result) == [(Source("cmds", 0, 0), Outcome.APPLIED, 99)]
    change = result.changes[0]
    assert (change.expected_stock, change.new_stock, change.marker["before"]) == (100.0, 99, 100)
    assert type(change.new_stock) is int


def test_duplicates_change_nothing_and_the_owner_is_applied() -> None:
    entries = [order(0, 1, 2, oid="A"), order(1, 1, 3, oid="A"), restock(2, 1, 1, rid="A")]
    owners: Owners = {("order", "A"): Source("cmds", 0, 0), ("restock", "A"): Source("cmds", 0, 2)}
    result = plan(entries, {1: {"stock": 10}}, owners)
    assert verdicts(result) == [
        (Source("cmds", 0, 0), Outcome.APPLIED, 8),
        (Source("cmds", 0, 1), Outcome.DUPLICATE, None),
        (Source("cmds", 0, 2), Outcome.APPLIED, 9),
    ]
    assert "cmds[0]@0" in (result.decisions[1].reason or "")
    (change,) = result.changes
    assert (change.new_stock, change.marker["first"], change.marker["last"]) == (9, 0, 2)


def test_a_duplicate_of_an_earlier_batch_changes_nothing() -> None:
    owners: Owners = {("order", 7): Source("cmds", 3, 40)}
    result = plan([order(0, 1, 2, oid=7)], {1: {"stock": 10}}, owners)
    assert [d.outcome for d in result.decisions] == [Outcome.DUPLICATE]
    assert result.changes == []


def test_replaying_a_written_but_uncommitted_batch_plans_the_same_and_writes_nothing() -> None:
    entries = [
        order(20, 1, 4),
        restock(21, 2, 5),
        order(22, 1, 9),
        order(23, 2, 1),
        order(24, 3, 1),
    ]
    docs: dict[int, Mapping[str, Any] | None] = {1: {"stock": 10}, 2: {"stock": 0}, 3: None}
    first = plan(entries, docs)
    assert {c.product_id for c in first.changes} == {1, 2}
    for change in first.changes:
        docs[change.product_id] = written(docs[change.product_id] or {}, change)
    again = plan(entries, docs)
    assert verdicts(again) == verdicts(first)
    assert again.changes == []


def test_replay_followed_by_new_entries_writes_only_the_new_ones() -> None:
    old = [order(0, 1, 3), restock(1, 1, 2), order(2, 1, 10)]
    docs: dict[int, Mapping[str, Any] | None] = {1: {"stock": 5}}
    first = plan(old, docs)
    (change,) = first.changes
    docs[1] = written({"stock": 5}, change)
    new = [order(3, 1, 1), order(4, 1, 9)]
    again = plan(old + new, docs)
    assert verdicts(again)[:3] == verdicts(first)
    assert verdicts(again)[3:] == [
        (Source("cmds", 0, 3), Outcome.APPLIED, 3),
        (Source("cmds", 0, 4), Outcome.INSUFFICIENT_STOCK, 3),
    ]
    marker = {
        "partition": 0,
        "first": 0,  # first, before and the steps so far are kept: 0..2 is still uncommitted
        "last": 4,
        "before": 5,
        "steps": {"0": 2, "1": 4, "2": 4, "3": 3, "4": 3},
        "baseline": 5,
        "since": 0,
    }
    assert again.changes == [ProductChange(1, None, 4, 2, 3, marker)]


def test_replay_after_two_crashes_with_a_growing_batch() -> None:
    batch = [order(0, 1, 3), order(1, 1, 3), order(2, 1, 4)]
    docs: dict[int, Mapping[str, Any] | None] = {1: {"stock": 6}}
    reference = plan(batch, {1: {"stock": 6}})  # 3, 0, insufficient at 0
    docs[1] = written({"stock": 6}, plan(batch[:1], docs).changes[0])  # crash 1: 0..0 written
    (second,) = plan(batch, docs).changes  # crash 2: 0..0 replayed, 1..2 written
    assert (second.expected_stock, second.expected_last, second.new_stock) == (3, 0, 0)
    assert {k: second.marker[k] for k in ("first", "last", "before", "steps")} == {
        "first": 0,
        "last": 2,
        "before": 6,
        "steps": {"0": 3, "1": 0, "2": 0},
    }
    docs[1] = written(docs[1] or {}, second)
    again = plan(batch, docs)  # replays 0..2 from stock 6, the stock before offset 0
    assert verdicts(again) == verdicts(reference)
    assert again.changes == []


def test_the_rest_of_a_written_batch_after_a_shorter_replay() -> None:
    batch = [order(0, 1, 1), order(1, 1, 1), order(2, 1, 3)]
    reference = plan(batch, {1: {"stock": 5}})  # all applied: 4, 3, 0
    doc = written({"stock": 5}, reference.changes[0])  # written, not committed
    shorter = plan(batch[:2], {1: doc})
    assert verdicts(shorter) == verdicts(reference)[:2]
    assert shorter.changes == []
    rest = plan(batch[2:], {1: doc})  # starts at offset 2, from the stock after offset 1
    assert verdicts(rest) == verdicts(reference)[2:]
    assert rest.changes == []


def test_a_replay_from_inside_the_written_range_followed_by_new_entries() -> None:
    batch = [order(0, 1, 1), order(1, 1, 1), order(2, 1, 3)]
    doc = written({"stock": 5}, plan(batch, {1: {"stock": 5}}).changes[0])  # 4, 3, 0
    result = plan([batch[2], restock(3, 1, 2), order(4, 1, 5)], {1: doc})
    assert verdicts(result) == [
        (Source("cmds", 0, 2), Outcome.APPLIED, 0),  # from steps["1"] == 3, not from 5
        (Source("cmds", 0, 3), Outcome.APPLIED, 2),
        (Source("cmds", 0, 4), Outcome.INSUFFICIENT_STOCK, 2),
    ]
    marker = {
        "partition": 0,
        "first": 0,
        "last": 4,
        "before": 5,
        "steps": {"0": 4, "1": 3, "2": 0, "3": 2, "4": 2},
        "baseline": 5,
        "since": 0,
    }
    assert result.changes == [ProductChange(1, None, 0, 2, 2, marker)]


def test_a_replay_of_only_new_entries_that_apply_nothing_writes_nothing() -> None:
    batch = [order(0, 1, 2), order(1, 1, 3)]
    doc = written({"stock": 5}, plan(batch, {1: {"stock": 5}}).changes[0])  # 3, 0
    result = plan([batch[1], order(2, 1, 1)], {1: doc})
    assert verdicts(result) == [
        (Source("cmds", 0, 1), Outcome.APPLIED, 0),
        (Source("cmds", 0, 2), Outcome.INSUFFICIENT_STOCK, 0),
    ]
    assert result.changes == []  # the marker for 0..1 stays valid


Step = tuple[bool, int, int]  # (is order, product, quantity)
steps = st.lists(
    st.tuples(st.booleans(), st.integers(1, 3), st.integers(1, 20)), min_size=1, max_size=40
)
initial_stocks = st.fixed_dictionaries({p: st.integers(0, 30) for p in (1, 2, 3)})


def entries_of(script: Sequence[Step], start: int = 0) -> list[Entry]:
    make = {True: order, False: restock}
    return [make[o](start + i, p, q) for i, (o, p, q) in enumerate(script)]


@given(steps, initial_stocks)
def test_stock_never_goes_negative_and_balances(script: list[Step], stocks: dict[int, int]) -> None:
    entries = entries_of(script)
    result = plan(entries, {p: {"stock": s} for p, s in stocks.items()})
    model = dict(stocks)
    for (is_order, product, qty), decision in zip(script, result.decisions, strict=True):
        assert decision.stock_after is not None and decision.stock_after >= 0
        if is_order and model[product] < qty:
            assert decision.outcome is Outcome.INSUFFICIENT_STOCK
        else:
            assert decision.outcome is Outcome.APPLIED
            model[product] += -qty if is_order else qty
        assert decision.stock_after == model[product]
    touched = {p for _, p, _ in script}
    assert {c.product_id for c in result.changes} == touched
    for change in result.changes:
        pid = change.product_id
        applied = [d.entry.command for d in result.decisions if d.outcome is Outcome.APPLIED]
        net = sum(c.delta for c in applied if c.product_id == pid)
        assert change.new_stock >= 0
        assert change.new_stock == stocks[pid] + net == model[pid]
        assert change.expected_stock == stocks[pid]


@given(steps, initial_stocks, st.integers(0, 40), st.booleans())
def test_a_crash_at_any_point_replays_to_the_same_decisions(
    script: list[Step], stocks: dict[int, int], cut: int, extend: bool
) -> None:
    entries = entries_of(script, start=100)
    old = entries[: cut if extend else len(entries)]
    docs: dict[int, Mapping[str, Any] | None] = {p: {"stock": s} for p, s in stocks.items()}
    reference = plan(entries if extend else old, docs)
    expected = {c.product_id: c for c in reference.changes}
    for change in plan(old, docs).changes:
        docs[change.product_id] = written(docs[change.product_id] or {}, change)
    replayed = plan(entries if extend else old, docs)
    assert verdicts(replayed) == verdicts(reference)
    fresh = {e.command.product_id for e in entries[len(old) :]} if extend else set()
    assert {c.product_id for c in replayed.changes} <= fresh
    for change in replayed.changes:
        doc = docs[change.product_id] or {}
        assert change.expected_stock == doc["stock"]
        assert change.expected_last == (doc.get(MARKER) or {}).get("last")
        # A product the crashed attempt wrote keeps that marker's first, before and steps, so
        # the new marker is the one a single uncrashed attempt would have written.
        assert change.new_stock == expected[change.product_id].new_stock
        assert change.marker == expected[change.product_id].marker
    final = {p: (d or {})["stock"] for p, d in docs.items()}
    final.update({c.product_id: c.new_stock for c in replayed.changes})
    assert final == {**stocks, **{c.product_id: c.new_stock for c in reference.changes}}


Attempt = tuple[int, bool, int]  # (batch size, committed, product whose write was lost)
attempts = st.lists(
    st.tuples(st.integers(1, 8), st.booleans(), st.integers(0, 3)), min_size=1, max_size=20
)


@given(steps, initial_stocks, attempts)
def test_crashes_between_batches_of_any_size_give_the_decisions_of_one_clean_run(
    script: list[Step], stocks: dict[int, int], tries: list[Attempt]
) -> None:
    """Each attempt re-fetches from the committed offset with its own batch size; a crashed
    one may have written some products' changes but not others (the bulk write is unordered)."""
    entries = entries_of(script, start=100)
    docs: dict[int, Mapping[str, Any] | None] = {p: {"stock": s} for p, s in stocks.items()}
    reference = plan(entries, docs)
    emitted: list[tuple[Source, Outcome, int | None]] = []
    committed = 0
    for size, commit, lost in [*tries, (len(entries), True, 0)]:
        if committed == len(entries):
            break
        batch = plan(entries[committed : committed + size], docs)
        for change in batch.changes:
            if commit or change.product_id != lost:
                doc = docs[change.product_id] or {}
                assert change.expected_last == (doc.get(MARKER) or {}).get("last")
                docs[change.product_id] = written(doc, change)
        if commit:
            emitted += verdicts(batch)
            committed += len(batch.decisions)
    assert emitted == verdicts(reference)
    final = {p: (d or {})["stock"] for p, d in docs.items()}
    assert final == {**stocks, **{c.product_id: c.new_stock for c in reference.changes}}
