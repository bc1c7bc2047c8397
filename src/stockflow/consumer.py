"""The consume loop: poll, decode, process, then mark the message done.

Offsets are stored only after a message has been fully processed and committed by librdkafka
in the background and on close, so a crash repeats the last few orders rather than losing
them (at-least-once). Runs are unbounded (until :meth:`OrderConsumer.stop`, which the CLI
calls on SIGINT/SIGTERM) or bounded by ``max_messages`` and ``idle_timeout``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message

from stockflow.config import Settings
from stockflow.errors import InvalidOrderError, ServiceUnavailableError
from stockflow.orders import decode_order
from stockflow.outcomes import OrderResult, Outcome
from stockflow.processor import OrderProcessor

log = logging.getLogger(__name__)

ResultHook = Callable[[Message, OrderResult], None]


@dataclass
class RunStats:
    """What a run did: messages seen and their outcomes."""

    messages: int = 0
    outcomes: Counter[Outcome] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = ", ".join(f"{o.value} {n}" for o, n in sorted(self.outcomes.items()))
        return f"{self.messages} message(s) in {self.seconds:.1f}s" + (
            f": {parts}" if parts else ""
        )


class OrderConsumer:
    """A consumer-group member that applies the orders of one topic."""

    def __init__(
        self,
        settings: Settings,
        processor: OrderProcessor,
        *,
        topic: str | None = None,
        group_id: str | None = None,
        start_offsets: Mapping[int, int] | None = None,
        on_result: ResultHook | None = None,
        **config: Any,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.topic = topic or settings.topic
        self.group_id = group_id or settings.group_id
        self.start_offsets = dict(start_offsets or {})
        self.on_result = on_result
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._config = settings.kafka_config(
            **{
                "group.id": self.group_id,
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "auto.commit.interval.ms": 1000,
                "session.timeout.ms": 10_000,
                "heartbeat.interval.ms": 1_000,
                **config,
            }
        )

    def stop(self) -> None:
        """Ask the loop to finish the message in hand and return (safe from signal handlers)."""
        self._stop.set()

    def _on_assign(self, consumer: Consumer, partitions: list[Any]) -> None:
        for tp in partitions:
            if tp.partition in self.start_offsets:
                tp.offset = self.start_offsets[tp.partition]
        if any(tp.partition in self.start_offsets for tp in partitions):
            consumer.assign(partitions)
        log.debug("assigned %s", [(tp.topic, tp.partition) for tp in partitions])
        self.assigned.set()

    def run(
        self, *, max_messages: int | None = None, idle_timeout: float | None = None
    ) -> RunStats:
        """Consume until stopped, ``max_messages`` are done, or nothing came for ``idle_timeout``.

        For each message:
        1. decode and validate it (an invalid message is logged and skipped);
        2. hand the order to the processor, whose writes are durable when it returns;
        3. store the message's offset, which librdkafka then commits.
        """
        stats = RunStats()
        started = last_activity = time.monotonic()
        consumer = Consumer(self._config)
        try:
            consumer.subscribe([self.topic], on_assign=self._on_assign)
            while not self._stop.is_set():
                if max_messages is not None and stats.messages >= max_messages:
                    break
                msg = consumer.poll(0.2)
                now = time.monotonic()
                if msg is None:
                    if idle_timeout is not None and now - last_activity > idle_timeout:
                        break
                    continue
                last_activity = now
                error = msg.error()
                if error is not None:
                    self._on_error(error)
                    continue
                result = self._process(msg)
                stats.messages += 1
                stats.outcomes[result.outcome] += 1
                if self.on_result is not None:
                    self.on_result(msg, result)
                consumer.store_offsets(message=msg)
        finally:
            stats.seconds = time.monotonic() - started
            consumer.close()  # commits the stored offsets
        return stats

    def _process(self, msg: Message) -> OrderResult:
        try:
            order = decode_order(msg.value())
        except InvalidOrderError as exc:
            log.error(
                "Rejected message %s[%s]@%s: %s",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                exc.reason,
            )
            return OrderResult(Outcome.INVALID, None, None, reason=exc.reason)
        return self.processor.handle(order)

    @staticmethod
    def _on_error(error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise ServiceUnavailableError(f"Kafka consumer failed: {error.str()}")
        log.warning("Kafka: %s", error.str())
