"""In-memory stand-ins for the Kafka clients of ``consumer.TransactionalLoop``.

They model what the loop's failure paths depend on, and nothing more: partitions with
positions, assignment and revocation served inside poll/consume (as librdkafka serves them),
pause/resume, seek, and transactions whose outputs and offsets become visible together on
commit. Faults are scripted by the tests (``FakeKafka.on_poll``, ``FakeProducer`` hooks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

TP = tuple[str, int]


class FakeMessage:
    def __init__(
        self, topic: str, partition: int, offset: int, value: bytes, headers: Any = None
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._headers = value, headers

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return None

    def headers(self) -> Any:
        return self._headers

    def error(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def __repr__(self) -> str:
        return f"<{self._topic}[{self._partition}]@{self._offset} {self._value!r}>"


@dataclass
class Produced:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: Any


@dataclass
class FakeKafka:
    """The broker: logs, committed offsets, committed outputs, and scripted events."""

    logs: dict[TP, list[FakeMessage]] = field(default_factory=dict)
    committed: dict[TP, int] = field(default_factory=dict)
    outputs: list[Produced] = field(default_factory=list)
    commits: list[dict[TP, int]] = field(default_factory=list)
    """Offsets of each committed transaction."""
    on_poll: list[Callable[[FakeConsumer], None]] = field(default_factory=list)
    """Run one per poll/consume call, before it returns messages (a rebalance, ...)."""
    consumers: list[FakeConsumer] = field(default_factory=list)
    producers: list[FakeProducer] = field(default_factory=list)
    producer_script: Callable[[FakeProducer], None] | None = None
    """Applied to every new producer (set its faults)."""

    def add(self, topic: str, partition: int, *values: bytes) -> None:
        log = self.logs.setdefault((topic, partition), [])
        for value in values:
            log.append(FakeMessage(topic, partition, len(log), value))

    def consumer(self, config: dict[str, Any]) -> FakeConsumer:
        c = FakeConsumer(self)
        self.consumers.append(c)
        return c

    def producer(self, config: dict[str, Any]) -> FakeProducer:
        p = FakeProducer(self, config)
        if self.producer_script is not None:
            self.producer_script(p)
        self.producers.append(p)
        return p

    def values(self, topic: str | None = None) -> list[bytes | None]:
        return [o.value for o in self.outputs if topic is None or o.topic == topic]


class FakeConsumer:
    """A group member that is assigned every partition of its topics on the first poll."""

    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka
        self.on_assign: Callable[[Any, list[TopicPartition]], None] | None = None
        self.on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None
        self.topics: list[str] = []
        self.assigned: set[TP] = set()
        self.paused: set[TP] = set()
        self.position: dict[TP, int] = {}
        self.polls = 0
        self.polls_while_paused = 0
        self.seeks: list[tuple[str, int, int]] = []
        self.closed = False
        self._joined = False

    # --- group ---
    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None) -> None:
        self.topics, self.on_assign, self.on_revoke = topics, on_assign, on_revoke

    def assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            self.paused.discard(key)
            start = tp.offset if tp.offset >= 0 else self.kafka.committed.get(key, 0)
            self.position[key] = start

    def rebalance(self, revoke: list[TP], assign: list[TP]) -> None:
        """Revoke then assign, as an eager rebalance does (call from an ``on_poll`` script)."""
        if revoke:
            tps = [TopicPartition(t, p) for t, p in revoke]
            if self.on_revoke is not None:
                self.on_revoke(self, tps)
            for key in revoke:
                self.assigned.discard(key)
                self.paused.discard(key)
                self.position.pop(key, None)
        if assign:
            tps = [TopicPartition(t, p) for t, p in assign]
            if self.on_assign is not None:
                self.on_assign(self, tps)
            else:
                self.assign(tps)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self.assigned)]

    def consumer_group_metadata(self) -> object:
        return "group-metadata"

    def close(self) -> None:
        self.closed = True

    # --- flow ---
    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update((tp.topic, tp.partition) for tp in partitions)

    def seek(self, tp: TopicPartition) -> None:
        key = (tp.topic, tp.partition)
        if key not in self.assigned:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION, "not assigned"))
        self.seeks.append((tp.topic, tp.partition, tp.offset))
        self.position[key] = tp.offset

    def _serve(self) -> None:
        self.polls += 1
        if self.paused:
            self.polls_while_paused += 1
        if not self._joined:
            self._joined = True
            every = [key for key in sorted(self.kafka.logs) if key[0] in self.topics]
            self.rebalance([], every)
        if self.kafka.on_poll:
            self.kafka.on_poll.pop(0)(self)

    def _take(self, limit: int) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        for key in sorted(self.assigned - self.paused):
            log = self.kafka.logs.get(key, [])
            while len(out) < limit and self.position[key] < len(log):
                out.append(log[self.position[key]])
                self.position[key] += 1
        return out

    def poll(self, timeout: float) -> FakeMessage | None:
        self._serve()
        got = self._take(1)
        if not got:
            time.sleep(min(timeout, 0.005))
            return None
        return got[0]

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self._serve()
        got = self._take(num_messages)
        if not got and timeout:
            time.sleep(min(timeout, 0.005))
        return got


def abortable(text: str = "abortable") -> KafkaException:
    return KafkaException(KafkaError(KafkaError._STATE, text, txn_requires_abort=True))


class FakeProducer:
    """A transactional producer; set the ``fail_*`` hooks to script its faults."""

    def __init__(self, kafka: FakeKafka, config: dict[str, Any]) -> None:
        self.kafka = kafka
        self.config = config
        self.pending: list[Produced] = []
        self.offsets: dict[TP, int] = {}
        self.in_txn = False
        self.aborts = 0
        self.fail_commit: list[BaseException] = []
        """Raised (one each) by the next commit_transaction calls."""
        self.fail_abort: list[BaseException] = []
        self.fail_produce: Callable[[str, bytes | None], BaseException | None] | None = None
        self.hang: dict[str, threading.Event] = {}
        """Step name -> event the step waits for (a hung call)."""
        self.delivery_errors: Callable[[Produced], KafkaError | None] | None = None
        """A broker-side rejection of an output: the delivery reports of every output sent in
        the same request fail, and so does the commit."""
        self.unsent: list[tuple[Produced, Any]] = []
        self.rejected = False
        self.fault: Callable[[str], BaseException | None] | None = None
        """Called with the step's name before each call that talks to the broker
        (init_transactions, send_offsets_to_transaction, commit_transaction,
        abort_transaction); the error it returns is raised (a broker outage, ...)."""

    def _maybe_hang(self, step: str) -> None:
        if step in self.hang:
            self.hang[step].wait()
        if self.fault is not None:
            error = self.fault(step)
            if error is not None:
                raise error

    def init_transactions(self, timeout: float) -> None:
        self._maybe_hang("init_transactions")

    def begin_transaction(self) -> None:
        assert not self.in_txn, "begin inside a transaction"
        self.in_txn, self.pending, self.offsets = True, [], {}
        self.unsent, self.rejected = [], False

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Any = None,
        on_delivery: Callable[[KafkaError | None, Any], None] | None = None,
    ) -> None:
        assert self.in_txn, "produce outside a transaction"
        if self.rejected:
            raise abortable("the transaction failed: a record was rejected")
        if self.fail_produce is not None:
            error = self.fail_produce(topic, value)
            if error is not None:
                raise error
        out = Produced(topic, value, key, headers)
        self.pending.append(out)
        self.unsent.append((out, on_delivery))

    def _send(self) -> bool:
        """Send what was produced since the last send as one request: the broker accepts or
        rejects it whole, as Kafka does a record batch. False if it was rejected."""
        request, self.unsent = self.unsent, []
        errors = [self.delivery_errors(out) for out, _ in request] if self.delivery_errors else []
        error = next((e for e in errors if e is not None), None)
        for out, on_delivery in request:
            if on_delivery is not None:
                on_delivery(error, FakeMessage(out.topic, 0, -1, out.value or b"", out.headers))
        self.rejected = self.rejected or error is not None
        return error is None

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: object, timeout: float
    ) -> None:
        assert self.in_txn
        self._maybe_hang("send_offsets_to_transaction")
        self.offsets.update({(tp.topic, tp.partition): tp.offset for tp in positions})

    def commit_transaction(self, timeout: float) -> None:
        assert self.in_txn
        self._maybe_hang("commit_transaction")
        if self.fail_commit:
            raise self.fail_commit.pop(0)
        self._send()
        if self.rejected:
            raise abortable("a record was rejected")
        self.kafka.outputs += self.pending
        self.kafka.committed.update(self.offsets)
        self.kafka.commits.append(dict(self.offsets))
        self.in_txn = False

    def abort_transaction(self, timeout: float) -> None:
        self.aborts += 1
        self._maybe_hang("abort_transaction")
        if self.fail_abort:
            raise self.fail_abort.pop(0)
        self.in_txn, self.pending, self.offsets = False, [], {}
        self.unsent, self.rejected = [], False

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        if self.in_txn:
            self._send()
        return 0
