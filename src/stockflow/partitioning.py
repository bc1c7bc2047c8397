"""Where the producer puts each order on the input topic: the partitioning strategies.

Pure: a strategy turns an order (and the topic's partition count) into the places it is sent
to, as :class:`Route` values; ``producer.OrderProducer`` does the sending. ``partition=None``
leaves the choice to Kafka's partitioner, which hashes the key.

Whatever the strategy, stock stays right: the router re-keys every order by its product on the
commands topic, so one product's changes still reach a single applier, and a copy of an order
(``broadcast``) is decided once, the other copies getting ``duplicate``.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from stockflow.errors import PartitionerError
from stockflow.orders import Command, Order


@dataclass(frozen=True, slots=True)
class Route:
    """One copy of an order: its partition (None: Kafka hashes the key) and its key."""

    partition: int | None
    key: bytes | None


class Partitioner(ABC):
    """A partitioning strategy."""

    name: ClassVar[str]
    needs_partition_count: ClassVar[bool] = True
    """False for strategies that leave the choice to Kafka (no topic metadata needed)."""

    @abstractmethod
    def routes(self, command: Command, partitions: int) -> tuple[Route, ...]:
        """Where ``command`` goes on a topic of ``partitions`` partitions (at least one)."""

    def check(self, partitions: int) -> None:
        """PartitionerError if this strategy cannot work on a topic of ``partitions``."""
        _ = partitions  # most strategies work on any topic

    def describe(self) -> str:
        return self.name


class ByProduct(Partitioner):
    """Key = product id: one product's orders share a partition, in order (the default)."""

    name = "product"
    needs_partition_count = False

    def routes(self, command: Command, partitions: int) -> tuple[Route, ...]:
        return (Route(None, command.key),)


class ToPartition(Partitioner):
    """Every order to one partition (keyed by product, but the key does not choose)."""

    name = "partition"

    def __init__(self, partition: int) -> None:
        if partition < 0:
            raise PartitionerError(f"--partition must be 0 or more, got {partition}")
        self.partition = partition

    def check(self, partitions: int) -> None:
        _in_range([self.partition], partitions)

    def routes(self, command: Command, partitions: int) -> tuple[Route, ...]:
        return (Route(self.partition, command.key),)

    def describe(self) -> str:
        return f"partition {self.partition}"


class RoundRobin(Partitioner):
    """Partition 0, 1, 2, ... in turn, whatever the key: the most even spread."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def routes(self, command: Command, partitions: int) -> tuple[Route, ...]:
        return (Route(next(self._next) % partitions, command.key),)


class ByCustomer(Partitioner):
    """Key = the order's ``customerId`` (one customer's orders in order), else the product."""

    name = "customer"
    needs_partition_count = False

    def routes(self, command: Command, partitions: int) -> tuple[Route, ...]:
        if isinstance(command, Order) and command.customer_id is not None:
            return (Route(None, str(command.customer_id).encode()),)
        return (Route(None, command.key),)


class Broadcast(Partitioner):
    """The same order to each of several partitions (None: all of them)."""

    name = "broadcast"

    def __init__(self, partitions: Sequence[int] | None) -> None:
        if partitions is not None:
            if not partitions:
                raise PartitionerError("--partitions names no partition")
            if min(partitions) < 0:
                raise PartitionerError("--partitions must be 0 or more")
            partitions = sorted(set(partitions))
        self.partitions = partitions

    def check(self, partitions: int) -> None:
        if self.partitions is not None:
            _in_range(self.partitions, partitions)

    def routes(self, command: Command, partitions: int) -> tuple[Route, ...]:
        targets = range(partitions) if self.partitions is None else self.partitions
        return tuple(Route(p, command.key) for p in targets)

    def describe(self) -> str:
        listed = "all" if self.partitions is None else ",".join(map(str, self.partitions))
        return f"broadcast to {listed}"


NAMES = ("product", "partition", "round-robin", "customer", "broadcast")
"""The strategies, as ``stockflow produce --partitioner`` names them."""


def parse_partitions(text: str) -> list[int] | None:
    """``"0,2,5"`` -> [0, 2, 5]; ``"all"`` -> None; PartitionerError otherwise."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PartitionerError(
            f"--partitions is a comma-separated list of partition numbers or `all`, got {text!r}"
        ) from None


def make_partitioner(
    name: str, *, partition: int | None = None, partitions: str | None = None
) -> Partitioner:
    """The strategy called ``name``, with its option; PartitionerError if they do not fit."""
    if partition is not None and name != "partition":
        raise PartitionerError("--partition goes with --partitioner partition")
    if partitions is not None and name != "broadcast":
        raise PartitionerError("--partitions goes with --partitioner broadcast")
    if name == "product":
        return ByProduct()
    if name == "partition":
        if partition is None:
            raise PartitionerError("--partitioner partition needs --partition N")
        return ToPartition(partition)
    if name == "round-robin":
        return RoundRobin()
    if name == "customer":
        return ByCustomer()
    if name == "broadcast":
        if partitions is None:
            raise PartitionerError("--partitioner broadcast needs --partitions 0,2,5 (or all)")
        return Broadcast(parse_partitions(partitions))
    raise PartitionerError(f"unknown partitioner {name!r}; one of: {', '.join(NAMES)}")


def _in_range(chosen: Sequence[int], partitions: int) -> None:
    beyond = [p for p in chosen if p >= partitions]
    if beyond:
        raise PartitionerError(
            f"partition {beyond[0]} does not exist: the topic has {partitions} "
            f"(0 to {partitions - 1})"
        )
