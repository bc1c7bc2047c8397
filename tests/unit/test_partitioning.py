"""The partitioning strategies: each sends an order where it promises, for any order and topic."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockflow.errors import PartitionerError
from stockflow.orders import Order, Restock
from stockflow.partitioning import (
    Broadcast,
    ByCustomer,
    ByProduct,
    RoundRobin,
    Route,
    ToPartition,
    make_partitioner,
    parse_partitions,
)

ids = st.one_of(st.integers(1, 2**53 - 1), st.text(min_size=1, max_size=20).filter(str.strip))
orders = st.builds(
    Order,
    order_id=ids,
    product_id=st.integers(1, 2**53 - 1),
    quantity=st.integers(1, 10),
    customer_id=st.one_of(st.none(), ids),
)
counts = st.integers(1, 64)


@given(orders, counts)
def test_product_keys_by_product_and_lets_kafka_choose(order: Order, partitions: int) -> None:
    assert ByProduct().routes(order, partitions) == (Route(None, str(order.product_id).encode()),)


@given(orders, st.data())
def test_partition_sends_everything_to_that_partition(order: Order, data: st.DataObject) -> None:
    partitions = data.draw(counts)
    chosen = data.draw(st.integers(0, partitions - 1))
    strategy = ToPartition(chosen)
    strategy.check(partitions)
    assert [r.partition for r in strategy.routes(order, partitions)] == [chosen]


@given(st.lists(orders, min_size=1, max_size=200), counts)
def test_round_robin_spreads_evenly_whatever_the_keys(batch: list[Order], partitions: int) -> None:
    strategy = RoundRobin()
    used = Counter(r.partition for o in batch for r in strategy.routes(o, partitions))
    assert set(used) <= set(range(partitions))
    assert max(used.values()) - min(used.values(), default=0) <= 1
    assert sum(used.values()) == len(batch)
    if len(batch) >= partitions:
        assert len(used) == partitions


def test_round_robin_spreads_one_products_orders_over_every_partition() -> None:
    strategy = RoundRobin()
    same = [Order(i, 101, 1) for i in range(12)]
    assert [strategy.routes(o, 4)[0].partition for o in same] == [0, 1, 2, 3] * 3


@given(orders, counts)
def test_customer_keys_by_customer_else_by_product(order: Order, partitions: int) -> None:
    (route,) = ByCustomer().routes(order, partitions)
    expected = order.product_id if order.customer_id is None else order.customer_id
    assert route == Route(None, str(expected).encode())


def test_customer_falls_back_to_the_product_for_restocks() -> None:
    assert ByCustomer().routes(Restock("r1", 7, 3), 3) == (Route(None, b"7"),)


@given(orders, st.data())
def test_broadcast_sends_one_copy_to_each_listed_partition(
    order: Order, data: st.DataObject
) -> None:
    partitions = data.draw(counts)
    listed = data.draw(st.lists(st.integers(0, partitions - 1), min_size=1))
    strategy = Broadcast(listed)
    strategy.check(partitions)
    routes = strategy.routes(order, partitions)
    assert [r.partition for r in routes] == sorted(set(listed))
    assert {r.key for r in routes} == {order.key}


@given(orders, counts)
def test_broadcast_all_covers_every_partition(order: Order, partitions: int) -> None:
    routes = Broadcast(None).routes(order, partitions)
    assert [r.partition for r in routes] == list(range(partitions))


def test_a_partition_beyond_the_topic_is_refused_before_sending() -> None:
    with pytest.raises(PartitionerError, match="partition 6 does not exist: the topic has 6"):
        ToPartition(6).check(6)
    with pytest.raises(PartitionerError, match="partition 5 does not exist"):
        Broadcast([0, 5]).check(3)
    with pytest.raises(PartitionerError, match="0 or more"):
        ToPartition(-1)


@pytest.mark.parametrize(
    ("name", "options", "kind"),
    [
        ("product", {}, ByProduct),
        ("partition", {"partition": 2}, ToPartition),
        ("round-robin", {}, RoundRobin),
        ("customer", {}, ByCustomer),
        ("broadcast", {"partitions": "0,2,5"}, Broadcast),
        ("broadcast", {"partitions": "all"}, Broadcast),
    ],
)
def test_make_partitioner_by_name(name: str, options: dict[str, object], kind: type) -> None:
    assert isinstance(make_partitioner(name, **options), kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("partition", {}, "needs --partition N"),
        ("broadcast", {}, "needs --partitions"),
        ("product", {"partition": 1}, "--partition goes with --partitioner partition"),
        ("customer", {"partitions": "all"}, "--partitions goes with --partitioner broadcast"),
        ("broadcast", {"partitions": "0,x"}, "comma-separated"),
        ("broadcast", {"partitions": ","}, "names no partition"),
        ("hash", {}, "unknown partitioner 'hash'"),
    ],
)
def test_make_partitioner_refuses_what_does_not_fit(
    name: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(PartitionerError, match=message):
        make_partitioner(name, **options)  # type: ignore[arg-type]


def test_parse_partitions() -> None:
    assert parse_partitions("0, 2,5") == [0, 2, 5]
    assert parse_partitions("ALL") is None
