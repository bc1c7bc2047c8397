"""Publishing orders to Kafka with delivery reports.

The producer is idempotent (``enable.idempotence``, ``acks=all``), so librdkafka's own retries
never write an order twice. By default every order is keyed by its product, so all changes to
one product land on one partition, in order; another strategy of ``partitioning.py`` can be
chosen (``partitioner=``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from stockflow import kafka_clients
from stockflow.config import Settings
from stockflow.errors import ProduceError, TopicError
from stockflow.orders import Command
from stockflow.partitioning import ByProduct, Partitioner

log = logging.getLogger(__name__)

Headers = dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]]
"""As librdkafka takes them: a list keeps repeated names (a replayed original's, say)."""


@dataclass
class DeliveryReport:
    """Counts of acknowledged and failed messages, with the first few errors."""

    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


class OrderProducer:
    """Sends orders (or raw bytes) to one topic and tracks their delivery."""

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        partitioner: Partitioner | None = None,
        **config: Any,
    ) -> None:
        self.topic = topic or settings.topic
        self.timeout = settings.kafka_timeout_seconds
        self.report = DeliveryReport()
        self.partitioner = partitioner or ByProduct()
        self._producer = Producer(kafka_clients.order_producer(settings, **config))
        self._partitions: int | None = None

    @property
    def partitions(self) -> int:
        """The topic's partition count (read once, when a strategy first needs it)."""
        if self._partitions is None:
            metadata = self._producer.list_topics(self.topic, timeout=self.timeout)
            found = metadata.topics.get(self.topic)
            if found is None or found.error is not None or not found.partitions:
                raise TopicError(f"topic {self.topic!r} does not exist")
            self._partitions = len(found.partitions)
            self.partitioner.check(self._partitions)
        return self._partitions

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.report.delivered += 1
            return
        self.report.failed += 1
        if len(self.report.errors) < 10:
            self.report.errors.append(f"{msg.topic()}: {err.str()}")
        log.error("Order not delivered to %s: %s", msg.topic(), err.str())

    def send(
        self,
        order: Command,
        *,
        headers: Headers | None = None,
        on_partition: Callable[[int], None] | None = None,
    ) -> None:
        """Queue one order (or restock) where the partitioner puts it (by default keyed by its
        product); ``on_partition`` is called with the partition of each copy once delivered."""
        partitions = self.partitions if self.partitioner.needs_partition_count else 1
        value = order.encode()
        for route in self.partitioner.routes(order, partitions):
            self.send_raw(
                value,
                key=route.key,
                headers=headers,
                partition=route.partition,
                on_partition=on_partition,
            )

    def send_raw(
        self,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        on_partition: Callable[[int], None] | None = None,
    ) -> None:
        """Queue any bytes (for tests, replays and foreign payloads); ``partition`` None lets
        Kafka's partitioner choose from the key."""
        on_delivery: Callable[[KafkaError | None, Message], None] = self._on_delivery
        if on_partition is not None:

            def tell(err: KafkaError | None, msg: Message) -> None:
                self._on_delivery(err, msg)
                delivered_to = msg.partition()
                if err is None and delivered_to is not None:
                    on_partition(delivered_to)

            on_delivery = tell

        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(
                    self.topic, value, key, headers=headers, on_delivery=on_delivery, **extra
                )
                break
            except BufferError:
                # The local queue is full: let deliveries drain, then try again.
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self) -> DeliveryReport:
        """Wait for every queued message's report; undelivered ones count as failed."""
        remaining = self._producer.flush(self.timeout)
        if remaining:
            self.report.failed += remaining
            self.report.errors.append(f"{remaining} message(s) still queued after {self.timeout}s")
        return self.report

    def close(self) -> DeliveryReport:
        """Flush and raise ProduceError if anything was not delivered."""
        report = self.flush()
        if not report.ok:
            raise ProduceError(
                f"{report.failed} of {report.delivered + report.failed} message(s) not delivered "
                f"to {self.topic!r}: " + "; ".join(report.errors[:3])
            )
        return report

    def __enter__(self) -> OrderProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.flush()
