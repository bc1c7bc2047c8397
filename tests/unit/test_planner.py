"""The batch planner: outcomes, one compare-and-set per product, and replay after a crash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from bson import BSON, Decimal128, Int64
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from stockflow.audit import Change, _counted
from stockflow.orders import Command, Order, Restock
from stockflow.outcomes import Outcome, Source
from stockflow.planner import (
    MARKER,
    MAX_TOPICS,
    Decision,
    Entry,
    Owner,
    Plan,
    ProductChange,
    owner_key,
    plan_batch,
)

Owners = Mapping[tuple[str, int | str], Owner]
Products = Mapping[int, Mapping[str, Any] | None]


def order(offset: int, product: int, qty: int, oid: int | str | None = None) -> Entry:
    command = Order(offset if oid is None else oid, product, qty)
    return Entry(Source("cmds", 0, offset), Source("in", 0, offset), command)


def restock(offset: int, product: int, qty: int, rid: int | str | None = None) -> Entry:
    command = Restock(offset if rid is None else rid, product, qty)
    return Entry(Source("cmds", 0, offset), Source("in", 0, offset), command)


def plan(entries: Sequence[Entry], products: Products, owners: Owners | None = None) -> Plan:
    return plan_batch(entries, products, owners or {})


def marker_of(version: int, *topics: Mapping[str, Any]) -> dict[str, Any]:
    """A marker of the current form (topic entries default to partition 0 and no id)."""
    return {
        "v": version,
        "baseline": 0,
        "topics": [{"id": None, "partition": 0, **t} for t in topics],
    }


def single(version: int, baseline: int, last: int, steps: dict[str, int]) -> dict[str, Any]:
    """The marker of a product written only by topic ``cmds`` (partition 0), since offset 0."""
    topic = {"topic": "cmds", "id": None, "partition": 0, "last": last, "since": 0}
    return {"v": version, "baseline": baseline, "topics": [{**topic, "steps": steps}]}


def written_range(change: ProductChange) -> tuple[int, int]:
    """The first and last offset the writer's entry of the change's marker covers."""
    writer = change.marker["topics"][-1]
    return min(int(k) for k in writer["steps"]), writer["last"]


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
        "v": 0,
        "baseline": 5,
        "topics": [
            {
                "topic": "cmds",
                "id": None,
                "partition": 0,
                "last": 13,
                "since": 10,
                # The stock after each applied command; -1 - stock for an order refused.
                "steps": {"10": 2, "11": 7, "12": 3, "13": -4},
            }
        ],
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
    assert written_range(changes[1]) == (0, 3)
    assert (changes[2].expected_stock, changes[2].new_stock) == (7, 8)
    assert written_range(changes[2]) == (1, 2)


def test_an_existing_marker_gives_the_expected_version_and_carries_baseline_and_since() -> None:
    old = marker_of(4, {"topic": "cmds", "last": 4, "since": 0, "steps": {"3": 9, "4": 8}})
    old["baseline"] = 7
    result = plan([order(5, 1, 2), restock(6, 1, 1)], {1: {"stock": 8, MARKER: old}})
    marker = {
        "v": 5,
        "baseline": 7,
        "topics": [
            # Not a replay: the steps start over at this batch; the audit's since stays.
            {"topic": "cmds", "id": None, "partition": 0, "last": 6, "since": 0,
             "steps": {"5": 6, "6": 7}},
        ],
    }  # fmt: skip
    assert result.changes == [ProductChange(1, None, 8, ("v", 4), 7, marker)]


def test_nothing_applied_writes_only_when_there_is_no_marker_yet() -> None:
    old = marker_of(0, {"topic": "cmds", "last": 0, "since": 0, "steps": {"0": 3}})
    with_marker = plan([order(1, 1, 5)], {1: {"stock": 2, MARKER: old}})
    assert verdicts(with_marker) == [(Source("cmds", 0, 1), Outcome.INSUFFICIENT_STOCK, 2)]
    assert with_marker.changes == []
    without = plan([order(1, 1, 5)], {1: {"stock": 2}})
    assert [(c.new_stock, c.expected_version, written_range(c)) for c in without.changes] == [
        (2, None, (1, 1))
    ]


def version_of(doc: Mapping[str, Any]) -> tuple[str, Any] | None:
    marker = doc.get(MARKER)
    return None if marker is None else ("v", marker["v"])


def test_unknown_product_is_rejected_without_a_change() -> None:
    result = plan([order(0, 9, 1), restock(1, 9, 1), order(2, 1, 1)], {9: None, 1: {"stock": 1}})
    assert [d.outcome for d in result.decisions[:2]] == [Outcome.UNKNOWN_PRODUCT] * 2
    assert all(d.stock_after is None for d in result.decisions[:2])
    assert [c.product_id for c in result.changes] == [1]


@pytest.mark.parametrize(
    "stock",
    [
        "10",
        -1,
        1.5,
        True,
        None,
        float("nan"),
        {"$gt": 0},
        # Numbers no stock can be: a write of them (less an order) would not even encode.
        1e300,
        float("inf"),
        -float("inf"),
        2.0**53,  # a double so large that it no longer counts single units
        2**62 + 1,
        2**63,
        Int64(2**63 - 1),
        -(2**63),
        Decimal128("5"),
        Decimal128("NaN"),
        "x" * 100_000,
    ],
)
def test_unusable_stock_dead_letters_the_products_commands(stock: Any) -> None:
    result = plan([order(0, 1, 1), restock(1, 1, 2)], {1: {"stock": stock}})
    assert [d.outcome for d in result.decisions] == [Outcome.DEAD_LETTERED] * 2
    assert all(d.reason and "unusable stock" in d.reason for d in result.decisions)
    assert all(len(d.reason or "") < 200 for d in result.decisions)  # the value, cut short
    assert result.changes == []


@pytest.mark.parametrize(
    ("stock", "after"), [(-0.0, 0), (0.0, 0), (Int64(7), 7), (2**53 - 1, 2**53 - 1), (2**62, 2**62)]
)
def test_odd_but_usable_stock_values_are_plain_ints(stock: Any, after: int) -> None:
    result = plan([restock(0, 1, 1), order(1, 1, 1)], {1: {"stock": stock}})
    assert [d.outcome for d in result.decisions] == [Outcome.APPLIED] * 2
    (change,) = result.changes
    assert change.new_stock == after and type(change.new_stock) is int
    assert type(change.marker["baseline"]) is int
    BSON.encode({"stock": change.new_stock, MARKER: change.marker})  # writable as it is


def test_an_integral_float_stock_is_accepted() -> None:
    result = plan([order(0, 1, 1)], {1: {"stock": 100.0}})
    assert verdicts(result) == [(Source("cmds", 0, 0), Outcome.APPLIED, 99)]
    change = result.changes[0]
    assert (change.expected_stock, change.new_stock, change.marker["baseline"]) == (100.0, 99, 100)
    assert type(change.new_stock) is int and type(change.marker["baseline"]) is int


def test_duplicates_change_nothing_and_the_owner_is_applied() -> None:
    entries = [order(0, 1, 2, oid="A"), order(1, 1, 3, oid="A"), restock(2, 1, 1, rid="A")]
    owners: Owners = {
        ("order", "A"): Owner(Source("cmds", 0, 0)),
        ("restock", "A"): Owner(Source("cmds", 0, 2)),
    }
    result = plan(entries, {1: {"stock": 10}}, owners)
    assert verdicts(result) == [
        (Source("cmds", 0, 0), Outcome.APPLIED, 8),
        (Source("cmds", 0, 1), Outcome.DUPLICATE, None),
        (Source("cmds", 0, 2), Outcome.APPLIED, 9),
    ]
    assert "cmds[0]@0" in (result.decisions[1].reason or "")
    (change,) = result.changes
    assert (change.new_stock, written_range(change)) == (9, (0, 2))


def test_a_duplicate_of_an_earlier_batch_changes_nothing() -> None:
    owners: Owners = {("order", 7): Owner(Source("cmds", 3, 40))}
    result = plan([order(0, 1, 2, oid=7)], {1: {"stock": 10}}, owners)
    assert [d.outcome for d in result.decisions] == [Outcome.DUPLICATE]
    assert result.changes == []


def test_the_same_position_of_a_recreated_topic_is_a_duplicate_not_the_owner() -> None:
    """A topic deleted and recreated repeats names, partitions and offsets: the id's owner is
    the same delivery only if Kafka's topic id matches too."""
    again = on("cmds", "id-new", 0, Order(7, 1, 2))
    result = plan([again], {1: {"stock": 10}}, {("order", 7): Owner(again.position, "id-old")})
    assert verdicts(result) == [(again.position, Outcome.DUPLICATE, None)]
    assert result.changes == []
    # The same incarnation (or an id unknown on either side) is the owner coming back.
    for owner in (Owner(again.position, "id-new"), Owner(again.position)):
        result = plan([again], {1: {"stock": 10}}, {("order", 7): owner})
        assert verdicts(result) == [(again.position, Outcome.APPLIED, 8)]


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
    # The steps so far are kept: 0..2 is still uncommitted.
    steps = {"0": 2, "1": 4, "2": -5, "3": 3, "4": -4}
    assert again.changes == [ProductChange(1, None, 4, ("v", 0), 3, single(1, 5, 4, steps))]


def test_replay_after_two_crashes_with_a_growing_batch() -> None:
    batch = [order(0, 1, 3), order(1, 1, 3), order(2, 1, 4)]
    docs: dict[int, Mapping[str, Any] | None] = {1: {"stock": 6}}
    reference = plan(batch, {1: {"stock": 6}})  # 3, 0, insufficient at 0
    docs[1] = written({"stock": 6}, plan(batch[:1], docs).changes[0])  # crash 1: 0..0 written
    (second,) = plan(batch, docs).changes  # crash 2: 0..0 replayed, 1..2 written
    assert (second.expected_stock, second.expected_version, second.new_stock) == (3, ("v", 0), 0)
    assert second.marker["topics"][0]["steps"] == {"0": 3, "1": 0, "2": -1}
    assert written_range(second) == (0, 2)
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
        (Source("cmds", 0, 2), Outcome.APPLIED, 0),  # read back from its step
        (Source("cmds", 0, 3), Outcome.APPLIED, 2),
        (Source("cmds", 0, 4), Outcome.INSUFFICIENT_STOCK, 2),
    ]
    steps = {"0": 4, "1": 3, "2": 0, "3": 2, "4": -3}
    assert result.changes == [ProductChange(1, None, 0, ("v", 0), 2, single(1, 5, 4, steps))]


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
        assert change.expected_version == version_of(doc)
        # A product the crashed attempt wrote keeps that marker's steps, so the new marker is
        # the one a single uncrashed attempt would have written (one write later).
        assert change.new_stock == expected[change.product_id].new_stock
        assert {**change.marker, "v": 0} == expected[change.product_id].marker
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
                assert change.expected_version == version_of(doc)
                docs[change.product_id] = written(doc, change)
        if commit:
            emitted += verdicts(batch)
            committed += len(batch.decisions)
    assert emitted == verdicts(reference)
    final = {p: (d or {})["stock"] for p, d in docs.items()}
    assert final == {**stocks, **{c.product_id: c.new_stock for c in reference.changes}}


# --- markers that know their topic ---------------------------------------------------------


def on(topic: str, tid: str | None, offset: int, command: Command) -> Entry:
    """An entry at ``offset`` of partition 0 of commands topic ``topic`` (Kafka id ``tid``)."""
    return Entry(Source(topic, 0, offset), Source(f"in-{topic}", 0, offset), command, tid)


def orders_on(topic: str, tid: str | None, count: int, qty: int, start: int = 0) -> list[Entry]:
    return [on(topic, tid, start + i, Order(f"{tid}-{start + i}", 1, qty)) for i in range(count)]


def run_committed(entries: Sequence[Entry], doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The product after a batch that was written and committed."""
    (change,) = plan(entries, {1: doc}).changes
    return written(doc, change)


@pytest.mark.parametrize("ids", [("id-a", "id-b"), (None, None)])
def test_another_topics_commands_at_the_same_offsets_are_decided_from_stock(
    ids: tuple[str | None, str | None],
) -> None:
    """Issue 10, case 1: B's offsets 0..2 once looked like a replay of A's 0..4."""
    doc = run_committed(orders_on("a.cmds", ids[0], 5, 1), {"stock": 100})
    result = plan(orders_on("b.cmds", ids[1], 3, 2), {1: doc})
    assert [(d.outcome, d.stock_after) for d in result.decisions] == [
        (Outcome.APPLIED, 98 - 5),
        (Outcome.APPLIED, 96 - 5),
        (Outcome.APPLIED, 94 - 5),
    ]
    (change,) = result.changes
    assert (change.expected_version, change.new_stock) == (("v", 0), 89)
    assert [(t["topic"], t["id"], t["last"], t["since"]) for t in change.marker["topics"]] == [
        ("a.cmds", ids[0], 4, 0),
        ("b.cmds", ids[1], 2, 0),
    ]
    assert change.marker["baseline"] == 100  # both topics' changes count from there


def test_a_recreated_topic_of_the_same_name_is_another_topic() -> None:
    doc = run_committed(orders_on("a.cmds", "id-a", 5, 1), {"stock": 100})
    result = plan(orders_on("a.cmds", "id-a-again", 3, 2), {1: doc})
    assert [d.stock_after for d in result.decisions] == [93, 91, 89]
    (change,) = result.changes
    # The deleted incarnation can never replay: it is forgotten, and the audit counts from
    # the stock stored when the new one first wrote.
    assert change.marker == {
        "v": 1,
        "baseline": 95,
        "topics": [
            {"topic": "a.cmds", "id": "id-a-again", "partition": 0, "last": 2, "since": 0,
             "steps": {"0": 93, "1": 91, "2": 89}},
        ],
    }  # fmt: skip


def test_an_old_format_marker_belongs_to_no_topic() -> None:
    old = {"partition": 0, "first": 0, "last": 4, "before": 100, "baseline": 100, "since": 0,
           "steps": {"0": 99, "1": 98, "2": 97, "3": 96, "4": 95}}  # fmt: skip
    result = plan(orders_on("b.cmds", "id-b", 3, 2), {1: {"stock": 95, MARKER: old}})
    assert [d.stock_after for d in result.decisions] == [93, 91, 89]
    (change,) = result.changes
    assert change.expected_version == ("last", 4)  # the compare-and-set checks the old marker
    assert (change.marker["v"], change.marker["baseline"]) == (5, 95)  # the version grows


def test_an_old_format_marker_is_converted_even_when_nothing_is_applied() -> None:
    old = {"partition": 0, "first": 0, "last": 4, "before": 3, "steps": {"4": 1}}
    result = plan([on("b.cmds", "id-b", 0, Order("x", 1, 2))], {1: {"stock": 1, MARKER: old}})
    assert [d.outcome for d in result.decisions] == [Outcome.INSUFFICIENT_STOCK]
    (change,) = result.changes
    assert change.marker["topics"][0]["steps"] == {"0": -2}


def test_a_replay_after_another_topic_wrote_is_read_from_its_steps() -> None:
    """A writes and crashes before its commit, B writes the product, A's batch comes again:
    the replay must neither apply A's commands again nor decide them from B's stock."""
    a_batch = [
        on("a", "A", 10, Order("a1", 1, 4)),
        on("a", "A", 11, Order("a2", 1, 9)),  # refused at 6
        on("a", "A", 12, Restock("a3", 1, 2)),
    ]
    first = plan(a_batch, {1: {"stock": 10}})
    doc = written({"stock": 10}, first.changes[0])  # 8, not committed
    doc = run_committed([on("b", "B", 0, Order("b1", 1, 7))], doc)  # 1
    again = plan([*a_batch, on("a", "A", 13, Order("a4", 1, 1))], {1: doc})
    assert verdicts(again)[:3] == verdicts(first)
    assert verdicts(again)[3] == (Source("a", 0, 13), Outcome.APPLIED, 0)  # from the stored 1
    (change,) = again.changes
    assert (change.expected_stock, change.new_stock) == (1, 0)
    writer = change.marker["topics"][-1]
    assert writer["steps"] == {"10": 6, "11": -7, "12": 8, "13": 0}
    # And a replay starting inside the written range reads every decision back as well.
    shorter = plan(a_batch[1:], {1: written(doc, change)})
    assert verdicts(shorter) == verdicts(first)[1:] and shorter.changes == []


def recorded_owners(decisions: Sequence[Decision]) -> Owners:
    """The owners of these decisions' ids, with the outcomes their records hold."""
    return {
        owner_key(d.entry.command): Owner(
            d.entry.position, d.entry.topic_id, d.outcome, d.stock_after, d.reason
        )
        for d in decisions
    }


def test_rewound_offsets_are_told_as_recorded_and_change_nothing() -> None:
    """Commands committed before the entry's steps began, read again (offsets rewound): their
    records hold their decisions, which are told again as they are, without touching stock."""
    first = plan(orders_on("a", "A", 3, 1), {1: {"stock": 10}})  # 0..2 committed: 7
    doc = written({"stock": 10}, first.changes[0])
    second = plan(orders_on("a", "A", 2, 1, start=3), {1: doc})  # steps now 3..4: 5
    doc = written(doc, second.changes[0])
    owners = recorded_owners([*first.decisions, *second.decisions])
    again = plan(orders_on("a", "A", 5, 1), {1: doc}, owners)
    assert verdicts(again) == verdicts(first) + verdicts(second)
    assert again.changes == []


def test_a_rewound_refusal_stays_a_refusal_after_a_restock() -> None:
    """An order of 5 refused at stock 3, then a restock of 10: read again, the order is the
    refusal it was (before: a phantom ``applied`` at 8 with no change written)."""
    refused = on("a", "A", 0, Order("o", 1, 5))
    first = plan([refused], {1: {"stock": 3, MARKER: marker_of(0)}})
    assert verdicts(first) == [(refused.position, Outcome.INSUFFICIENT_STOCK, 3)]
    assert first.changes == []
    restock_ = on("a", "A", 1, Restock("r", 1, 10))
    second = plan([restock_], {1: {"stock": 3, MARKER: marker_of(0)}})
    doc = written({"stock": 3, MARKER: marker_of(0)}, second.changes[0])
    owners = recorded_owners([*first.decisions, *second.decisions])
    for batch in ([refused], [refused, restock_]):
        again = plan(batch, {1: doc}, owners)
        assert verdicts(again) == verdicts(first) + verdicts(second)[: len(batch) - 1]
        assert again.changes == []


def test_more_topics_than_a_marker_keeps_forget_the_least_recently_written() -> None:
    doc: Mapping[str, Any] = {"stock": 1000}
    for n in range(MAX_TOPICS + 2):
        doc = run_committed([on(f"t{n}", f"id{n}", 5 + n, Order(f"o{n}", 1, 1))], doc)
    doc = run_committed([on("t3", "id3", 100, Order("again", 1, 1))], doc)
    marker = doc[MARKER]
    assert len(marker["topics"]) == MAX_TOPICS
    assert [t["topic"] for t in marker["topics"]] == [
        *[f"t{n}" for n in range(2, MAX_TOPICS + 2) if n != 3],
        "t3",
    ]
    assert marker["v"] == MAX_TOPICS + 2  # one write each
    # Forgetting t0 and t1 rebased the audit on t9's write: it counts from stock 991.
    assert marker["baseline"] == 991
    since = {t["topic"]: t["since"] for t in marker["topics"]}
    assert since["t9"] == 14 and since["t3"] == 9 and since["t8"] == 14


# A model of pipelines on one database: commands topics, crashes, records and the audit.

Script = list[tuple[bool, int, int]]  # (is order, product, quantity)
pipeline_scripts = st.lists(
    st.tuples(st.booleans(), st.integers(1, 2), st.integers(1, 9)), min_size=1, max_size=25
)
TOPICS = [("a", "A"), ("b", "B"), ("a", "A2")]  # the third: topic a deleted and recreated
Attempt2 = tuple[int, int, bool, int, bool]  # topic, batch size, committed, write lost, recorded
schedules = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(1, 6), st.booleans(), st.integers(0, 2), st.booleans()
    ),
    max_size=30,
)


@hsettings(max_examples=300)
@given(
    st.lists(pipeline_scripts, min_size=3, max_size=3),
    st.fixed_dictionaries({1: st.integers(0, 20), 2: st.integers(0, 20)}),
    schedules,
)
@example(  # refused without a write and recorded; b restocks; the replay stays a refusal
    scripts=[[(False, 2, 1)], [(False, 2, 1)], [(True, 2, 2)]],
    stocks={1: 0, 2: 0},
    schedule=[(0, 1, False, 0, False), (2, 1, False, 0, True)],
)
def test_pipelines_sharing_products_with_crashes_apply_every_command_once(
    scripts: list[Script], stocks: dict[int, int], schedule: list[Attempt2]
) -> None:
    """Batches of three commands topics (the third a recreated incarnation of the first)
    interleave on the same products, each attempt possibly crashing after some writes, or after
    recording its outcomes, before its commit. Whatever the order: every command is decided
    once, stock moves by exactly the published outcomes, the records agree with them, and the
    audit's books balance."""
    make = {True: Order, False: Restock}
    topics = [
        [
            on(name, tid, i, make[is_order](f"{tid}-{i}", product, qty))
            for i, (is_order, product, qty) in enumerate(script)
        ]
        for (name, tid), script in zip(TOPICS, scripts, strict=True)
    ]
    docs: dict[int, Mapping[str, Any] | None] = {p: {"stock": s} for p, s in stocks.items()}
    committed = [0, 0, 0]
    # By topic id and position (a recreated topic repeats positions).
    published: dict[tuple[str | None, Source], Decision] = {}
    records: dict[tuple[str | None, Source], Decision] = {}  # inserted once, never replaced

    def attempt(t: int, size: int, commit: bool, lost: int, recorded: bool) -> None:
        if t == 2 and committed[0] < len(topics[0]):
            attempt(0, len(topics[0]), True, 0, True)  # a is done before it is deleted
        batch = topics[t][committed[t] : committed[t] + size]
        if not batch:
            return
        owners = recorded_owners(
            [d for e in batch if (d := records.get((e.topic_id, e.position))) is not None]
        )
        result = plan(batch, docs, owners)
        for change in result.changes:
            doc = docs[change.product_id] or {}
            assert (doc["stock"], version_of(doc)) == (
                change.expected_stock,
                change.expected_version,
            )
            if commit or change.product_id != lost:
                docs[change.product_id] = written(doc, change)
        lost_any = not commit and lost in {c.product_id for c in result.changes}
        if commit or (recorded and not lost_any):
            for d in result.decisions:
                records.setdefault((d.entry.topic_id, d.entry.position), d)
        if commit:
            published.update(((d.entry.topic_id, d.entry.position), d) for d in result.decisions)
            committed[t] += len(batch)

    for step in [*schedule, *((t, 99, True, 0, True) for t in range(3))]:
        attempt(*step)

    assert len(published) == sum(len(t) for t in topics)
    for pid, stock in stocks.items():
        applied = [
            d.entry.command.delta
            for d in published.values()
            if d.outcome is Outcome.APPLIED and d.entry.command.product_id == pid
        ]
        doc = docs[pid] or {}
        assert doc["stock"] == stock + sum(applied) >= 0
        changes = [
            Change(d.entry.position, d.entry.topic_id, d.entry.command.delta)
            for d in records.values()
            if d.outcome is Outcome.APPLIED and d.entry.command.product_id == pid
        ]
        if MARKER in doc:
            assert doc[MARKER]["baseline"] + _counted(doc[MARKER], changes) == doc["stock"]
    assert all((d.stock_after or 0) >= 0 for d in published.values())
    assert {p: (d.outcome, d.stock_after) for p, d in records.items()} == {
        p: (d.outcome, d.stock_after) for p, d in published.items()
    }


# --- one product on several partitions in one batch ----------------------------------------


def at(partition: int, offset: int, command: Command) -> Entry:
    return Entry(Source("cmds", partition, offset), Source("in", 0, 1000 + offset), command)


def test_a_replay_of_one_partition_with_new_commands_of_another_in_one_batch() -> None:
    """Partition 0's written batch comes again with a new order of the same product from
    partition 1 at an offset inside partition 0's range: before, that order was read back
    from partition 0's step of the same offset (a phantom ``applied``, nothing written)."""
    p0 = [at(0, i, Order(f"p0-{i}", 1, 1)) for i in range(5)]
    first = plan(p0, {1: {"stock": 100}})
    doc = written({"stock": 100}, first.changes[0])  # 95, not committed
    new = at(1, 3, Order("p1-3", 1, 2))
    again = plan([*p0, new], {1: doc})
    assert verdicts(again) == [*verdicts(first), (new.position, Outcome.APPLIED, 93)]
    (change,) = again.changes
    assert (change.expected_stock, change.new_stock) == (95, 93)
    assert change.expected_version == version_of(doc)
    entries_ = {t["partition"]: t for t in change.marker["topics"]}
    assert entries_[0]["last"] == 4 and len(entries_[0]["steps"]) == 5
    assert (entries_[1]["last"], entries_[1]["steps"]) == (3, {"3": 93})
    # And that write replayed in turn reads both partitions back, writing nothing.
    replay = plan([*p0, new], {1: written(doc, change)})
    assert verdicts(replay) == verdicts(again) and replay.changes == []


mixed = st.lists(
    st.tuples(st.integers(0, 1), st.booleans(), st.integers(1, 2), st.integers(1, 20)),
    min_size=1,
    max_size=30,
)


@given(mixed, initial_stocks, st.integers(0, 30))
# Partition 0 restocks, partition 1's refused order, crash, and the replay meets a later
# restock of partition 0 first: the refusal wrote nothing, so it may be decided afresh.
@example(
    [(0, False, 1, 1), (0, False, 1, 1), (1, True, 1, 3), (0, False, 1, 1)], {1: 0, 2: 0, 3: 0}, 3
)
def test_commands_of_several_partitions_replay_consistently(
    script: list[tuple[int, bool, int, int]], stocks: dict[int, int], cut: int
) -> None:
    """A batch mixing two partitions' commands on shared products, written up to a cut and
    crashed, then replayed whole: the written commands keep their decisions, stock moves by
    exactly the replay's applied commands, and reading it again changes nothing."""
    offsets = [0, 0]
    batch = []
    for partition, is_order, product, qty in script:
        offset = offsets[partition]
        offsets[partition] += 1
        kind = Order if is_order else Restock
        batch.append(at(partition, offset, kind(f"{partition}-{offset}", product, qty)))
    docs: dict[int, Mapping[str, Any] | None] = {p: {"stock": s} for p, s in stocks.items()}
    old = plan(batch[:cut], docs)
    for change in old.changes:
        docs[change.product_id] = written(docs[change.product_id] or {}, change)
    replayed = plan(batch, docs)
    # What the crashed attempt wrote keeps its decision. A partition's refusals that needed no
    # write left nothing durable (no record, nothing published): the replay, which may now
    # meet another partition's later commands first, decides those afresh.
    written_at = {
        (item["partition"], int(offset))
        for change in old.changes
        for item in change.marker["topics"]
        for offset in item["steps"]
    }

    def durable(p: Plan) -> list[tuple[Source, Outcome, int | None]]:
        return [v for v in verdicts(p) if (v[0].partition, v[0].offset) in written_at]

    assert durable(replayed) == durable(old)
    for change in replayed.changes:
        doc = docs[change.product_id] or {}
        assert (change.expected_stock, change.expected_version) == (doc["stock"], version_of(doc))
        docs[change.product_id] = written(doc, change)
    for pid, stock in stocks.items():
        applied = [
            d.entry.command.delta
            for d in replayed.decisions
            if d.outcome is Outcome.APPLIED and d.entry.command.product_id == pid
        ]
        assert (docs[pid] or {})["stock"] == stock + sum(applied) >= 0
    assert all((d.stock_after or 0) >= 0 for d in replayed.decisions)
    # Committed, then read again: told as recorded, nothing written.
    again = plan(batch, docs, recorded_owners(replayed.decisions))
    assert verdicts(again) == verdicts(replayed) and again.changes == []
