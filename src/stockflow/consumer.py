"""Consume → handle → produce, with the outputs and the input offsets in one Kafka transaction.

Both stages of stockflow run this loop with their own handler. For each batch:

1. poll up to ``batch_size`` messages (``read_committed``: aborted outputs are never seen; a
   bounded run takes no more than it has left), gathered in hand: a revocation served by
   any later poll drops the revoked partitions' messages from the hand (their next owner
   reads them from the committed offsets), and a batch left empty is dropped;
2. hand them to the handler, whose side effects (MongoDB writes) are durable and idempotent
   when it returns; on a transient failure the assigned partitions are paused (the circuit
   opens), the batch is retried with backoff while the group membership is kept, and work
   resumes when the dependency answers; whichever way the batch ends, every partition paused
   meanwhile is resumed;
3. in one transaction: produce the handler's outputs (one that cannot be produced -- too
   large, rejected by the broker -- is replaced by a small dead letter), add the offsets of
   the batch's partitions still owned, commit;
4. when the transaction fails, abort it and rewind to the batch's first offsets, so the batch
   is handled again (idempotently) rather than lost;
5. call the handler's ``on_commit`` hook (log lines, counts).

A message that keeps failing for a non-transient reason is retried ``max_attempts`` times,
then handled alone, and if it still fails, dead-lettered with the reason.

Every call that could hang has a deadline (``watchdog``): the handler's work on a batch
(its MongoDB and Redis calls; ``handler_timeout_seconds``) and each Kafka transaction. A call
past its deadline, or still running ``stop_grace_seconds`` after a stop was asked, ends the
process with ``EXIT_STUCK`` before anything of the batch is committed; the supervisor
(``stockflow consume``) starts a fresh worker, and the batch's next owner redoes it
idempotently.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from stockflow import kafka_clients
from stockflow.config import Settings
from stockflow.deadletters import H_REASON, dead_letter_headers, dead_letter_source, header_map
from stockflow.errors import ServiceUnavailableError, TransientError
from stockflow.outcomes import Headers, Source, source_of
from stockflow.retry import CircuitBreaker
from stockflow.watchdog import CallAbandoned, Watchdog, exit_stuck

log = logging.getLogger(__name__)


UNPRODUCIBLE = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
    }
)
"""Errors that say a record can never be produced as it is (not that Kafka is unavailable)."""
H_ORIGINAL_TOPIC = "stockflow.dlq.original.topic"
H_ORIGINAL_SIZE = "stockflow.dlq.original.size"
H_ORIGINAL_SHA256 = "stockflow.dlq.original.sha256"


def _size(out: Output) -> int:
    headers = sum(len(k) + len(v or b"") for k, v in out.headers or [])
    return len(out.value or b"") + len(out.key or b"") + headers


class _Stopping(Exception):
    """Raised out of a wait for Kafka when the loop was asked to stop meanwhile."""


def _close_quietly(producer: ProducerLike) -> None:
    # Everything that matters was produced inside committed transactions; a producer that was
    # fenced or lost its broker has nothing left worth waiting for.
    try:
        producer.flush(5)
    except KafkaException as exc:
        log.debug("producer flush at close: %s", exc)


@dataclass(frozen=True, slots=True)
class Output:
    """A message to produce inside the batch's transaction."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Headers | None = None
    source: Source | None = None
    """The input message it comes from, if one: named by the loop's own dead letter should
    this output be impossible to produce (a dead letter's source headers also name it)."""


@dataclass
class Handled:
    """What a handler returns: messages to produce, and what to do once they are committed."""

    outputs: list[Output]
    on_commit: Callable[[], None] | None = None
    counts: Counter[str] = field(default_factory=Counter)


class Handler(Protocol):
    """One stage's work on a batch."""

    name: str
    breaker: CircuitBreaker

    def handle(self, messages: Sequence[Message]) -> Handled:
        """Do the batch's durable, idempotent side effects; raise TransientError to retry."""
        ...

    def dead_letter(self, message: Message, reason: str, attempts: int) -> Output:
        """The dead-letter record of a message that cannot be handled; TransientError when
        what it needs to make one (MongoDB, where originals are kept) is unavailable."""
        ...


class ConsumerLike(Protocol):
    """What the loop uses of ``confluent_kafka.Consumer``."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] = ...,
        on_revoke: Callable[[Any, list[TopicPartition]], None] = ...,
    ) -> None: ...
    def poll(self, timeout: float) -> Message | None: ...
    def consume(self, num_messages: int, timeout: float) -> list[Message]: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def assignment(self) -> list[TopicPartition]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def seek(self, partition: TopicPartition) -> None: ...
    def consumer_group_metadata(self) -> object: ...
    def close(self) -> None: ...


class ProducerLike(Protocol):
    """What the loop uses of a transactional ``confluent_kafka.Producer``."""

    def init_transactions(self, timeout: float) -> None: ...
    def begin_transaction(self) -> None: ...
    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        headers: Headers | None = None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None: ...
    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: object, timeout: float
    ) -> None: ...
    def commit_transaction(self, timeout: float) -> None: ...
    def abort_transaction(self, timeout: float) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


@dataclass
class LoopStats:
    """Committed messages and the handler's counts."""

    messages: int = 0
    batches: int = 0
    rewinds: int = 0
    dropped: int = 0
    """Messages in hand dropped because their partition was revoked."""
    unproducible: int = 0
    """Outputs replaced by the loop's dead letter because they could not be produced."""
    counts: Counter[str] = field(default_factory=Counter)
    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Time spent handling batches and in Kafka transactions."""


def _first_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    first: dict[tuple[str, int], int] = {}
    for m in messages:
        s = source_of(m)
        first.setdefault((s.topic, s.partition), s.offset)
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


def _next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        s = source_of(m)
        last[(s.topic, s.partition)] = s.offset + 1
    return [TopicPartition(t, p, o) for (t, p), o in last.items()]


class TransactionalLoop:
    """A consumer-group member running one handler transactionally."""

    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        *,
        topics: list[str],
        group_id: str,
        consumer_config: dict[str, Any] | None = None,
        start_offsets: dict[int, int] | None = None,
        consumer_factory: Callable[[dict[str, Any]], ConsumerLike] = Consumer,
        producer_factory: Callable[[dict[str, Any]], ProducerLike] = Producer,
    ) -> None:
        """``consumer_factory`` and ``producer_factory`` build the Kafka clients from their
        configurations (``kafka_clients``); tests pass fakes to drive the failure paths."""
        self.settings = settings
        self.handler = handler
        self.topics = topics
        self.group_id = group_id
        self.stats = LoopStats()
        self.start_offsets = dict(start_offsets or {})
        """Where to start reading (partition -> offset) instead of the committed offsets."""
        self.assigned = threading.Event()
        self.idle_since = time.monotonic()
        self.busy = False
        """True while the handler works on a batch."""
        self.hold: Callable[[], bool] | None = None
        """While this says True, keep adding what arrives to the batch (up to ``hold_ms``)."""
        self.hold_ms = 0
        self.max_messages: int | None = None
        """Stop once this many input messages are committed (``run(max_messages=)``; another
        thread may set it while the loop runs)."""
        self._stop = threading.Event()
        self._owned: set[tuple[str, int]] = set()
        """The partitions assigned to this member now."""
        self._in_hand: list[Message] = []
        """The batch being gathered or handled; a revocation removes its partitions' messages."""
        self._paused: frozenset[tuple[str, int]] = frozenset()
        """Partitions this loop paused; every path out of a batch resumes them. Replaced, never
        changed in place, so that ``paused`` can read it from another thread."""
        self.on_stuck: Callable[[str], None] = exit_stuck
        """Called (from the watchdog thread) when a call hangs (``watchdog``)."""
        self.transaction_seconds = 3 * settings.kafka_timeout_seconds + 10
        """Deadline of one Kafka transaction (its calls have ``kafka_timeout_seconds`` each)."""
        self._watchdog = Watchdog(handler.name)
        client_id = f"stockflow-{handler.name}"
        self._consumer_config = kafka_clients.loop_consumer(
            settings, group_id=group_id, client_id=client_id, **(consumer_config or {})
        )
        self._producer_config = kafka_clients.transactional_producer(settings, client_id=client_id)
        self._consumer_factory = consumer_factory
        self._producer_factory = producer_factory

    # --- control ---
    def stop(self) -> None:
        """Finish or abandon the batch in hand safely, then return from run().

        A call still running ``stop_grace_seconds`` later is given up by the watchdog (by
        default: the process exits with ``EXIT_STUCK``, nothing of the batch committed)."""
        self._stop.set()
        self._watchdog.stopping()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> list[str]:
        """The partitions paused now (``topic[partition]``): while the handler's circuit is
        open, or while a failed batch waits to be retried; empty otherwise."""
        return [f"{t}[{p}]" for t, p in sorted(self._paused)]

    def _pause(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        consumer.pause(partitions)
        self._paused = self._paused | {(tp.topic, tp.partition) for tp in partitions}

    def _resume(self, consumer: ConsumerLike) -> None:
        """Resume every partition this loop paused that is still assigned to it."""
        if not self._paused:
            return
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        ours = [TopicPartition(t, p) for t, p in sorted(self._paused & assigned)]
        self._paused = frozenset()
        if ours:
            consumer.resume(ours)

    def _on_assign(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._owned.add((tp.topic, tp.partition))
            if tp.partition in self.start_offsets:
                tp.offset = self.start_offsets.pop(tp.partition)
        consumer.assign(partitions)
        self._partitions_changed()
        log.debug(
            "%s: assigned %s", self.handler.name, [(tp.topic, tp.partition) for tp in partitions]
        )
        self.assigned.set()

    def _on_revoke(self, consumer: ConsumerLike, partitions: list[TopicPartition]) -> None:
        # Called inside poll/consume, so no batch is being written now. The messages of these
        # partitions in hand are dropped: their next owner (maybe this member again, from the
        # committed offsets) handles them; nothing of theirs is produced or committed here.
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._owned -= gone
        self._paused = self._paused - gone
        kept = [m for m in self._in_hand if (m.topic(), m.partition()) not in gone]
        self.stats.dropped += len(self._in_hand) - len(kept)
        self._in_hand = kept
        self._partitions_changed()
        log.debug(
            "%s: revoked %s", self.handler.name, [(tp.topic, tp.partition) for tp in partitions]
        )

    def _partitions_changed(self) -> None:
        hook = getattr(self.handler, "on_partitions_changed", None)
        if hook is not None:
            hook()

    # --- the loop ---
    def run(
        self, *, idle_timeout: float | None = None, max_messages: int | None = None
    ) -> LoopStats:
        """Run until stopped, until no message came for ``idle_timeout`` seconds, or until
        ``max_messages`` input messages are committed (a bounded run: no batch takes more
        than what is left)."""
        if max_messages is not None:
            self.max_messages = max_messages
        watchdog = self._watchdog = Watchdog(
            self.handler.name,
            on_stuck=self.on_stuck,
            grace_seconds=self.settings.stop_grace_seconds,
        )
        if self._stop.is_set():
            watchdog.stopping()
        watchdog.start()
        consumer = self._consumer_factory(self._consumer_config)
        try:
            producer = self._new_producer()
        except (_Stopping, CallAbandoned):
            watchdog.close()
            consumer.close()
            return self.stats
        try:
            consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
            self.idle_since = time.monotonic()
            while not self._stop.is_set() and self._left() != 0:
                messages = self._next_batch(consumer)
                if not messages:
                    if (
                        idle_timeout is not None
                        and time.monotonic() - self.idle_since > idle_timeout
                    ):
                        break
                    continue
                producer = self._run_batch(consumer, producer)
                self.idle_since = time.monotonic()
        except _Stopping:
            pass  # asked to stop while waiting for Kafka: nothing was in flight
        except CallAbandoned as exc:
            log.error("%s: batch abandoned, nothing committed (%s)", self.handler.name, exc)
        finally:
            self._close(consumer, producer)
        return self.stats

    def _close(self, consumer: ConsumerLike, producer: ProducerLike) -> None:
        watchdog = self._watchdog
        try:
            if watchdog.fired is not None:
                return  # a call hung: closing could hang too, and nothing is left to save
            with watchdog.deadline("closing the Kafka clients", self.transaction_seconds):
                try:
                    consumer.close()
                finally:
                    _close_quietly(producer)
        except CallAbandoned:
            pass
        finally:
            watchdog.close()

    def _next_batch(self, consumer: ConsumerLike) -> list[Message]:
        """Wait (briefly) for one message, then take what else has arrived, up to a batch.

        A quiet stream gets small batches at once (low latency); a busy one gets full batches,
        since the client fetches the next messages while the last batch is handled. The batch
        is gathered in ``_in_hand``, so that a revocation served by a later call removes the
        messages of the revoked partitions already taken.
        """
        self._in_hand = []
        first = consumer.poll(0.25)
        if first is None:
            return []
        self._take([first])
        left = self._left()
        limit = (
            self.settings.batch_size
            if left is None
            else max(1, min(left, self.settings.batch_size))
        )
        if limit > 1:
            self._take(consumer.consume(limit - 1, 0))
        if self.hold is not None and self.hold_ms > 0:
            deadline = time.monotonic() + self.hold_ms / 1000
            while (
                len(self._in_hand) < limit
                and self.hold()
                and time.monotonic() < deadline
                and not self._stop.is_set()
            ):
                self._take(consumer.consume(limit - len(self._in_hand), 0.002))
        return list(self._in_hand)

    def _left(self) -> int | None:
        """Input messages a bounded run may still commit; None when unbounded."""
        if self.max_messages is None:
            return None
        return max(0, self.max_messages - self.stats.messages)

    def _take(self, messages: Sequence[Message]) -> None:
        self._in_hand += [
            m for m in messages if self._ok(m) and (m.topic(), m.partition()) in self._owned
        ]

    def _ok(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.code() == KafkaError._PARTITION_EOF:
            return False
        if error.fatal():
            raise ServiceUnavailableError(
                f"{self.handler.name}: Kafka consumer failed: {error.str()}"
            )
        log.warning("%s: Kafka: %s", self.handler.name, error.str())
        return False

    def _new_producer(self) -> ProducerLike:
        producer = self._producer_factory(self._producer_config)
        breaker = CircuitBreaker(f"{self.handler.name}: Kafka transactions")
        while True:
            try:
                with self._watchdog.deadline("initialising transactions", self.transaction_seconds):
                    producer.init_transactions(self.settings.kafka_timeout_seconds)
                breaker.succeeded()
                return producer
            except KafkaException as exc:
                if self._stop.is_set():
                    raise _Stopping from exc
                time.sleep(breaker.failed(exc))

    def _run_batch(self, consumer: ConsumerLike, producer: ProducerLike) -> ProducerLike:
        """Handle and commit the batch in hand; returns the producer to use next."""
        began = time.perf_counter()
        self.busy = True
        try:
            result = self._handle_with_retries(consumer)
        finally:
            self.busy = False
            self.stats.seconds["handle"] += time.perf_counter() - began
        if result is None:
            self._rewind(consumer, self._in_hand)
            self._in_hand = []
            return producer
        handled, messages = result
        self._in_hand = []
        txn_started = time.monotonic()
        try:
            with self._watchdog.deadline("a Kafka transaction", self.transaction_seconds):
                producer, committed = self._transact(consumer, producer, handled, messages)
        finally:
            self.stats.seconds["transaction"] += time.monotonic() - txn_started
        if not committed:
            return producer
        self.stats.messages += len(messages)
        self.stats.batches += 1
        self.stats.counts.update(handled.counts)
        if handled.on_commit is not None:
            handled.on_commit()
        return producer

    def _transact(
        self,
        consumer: ConsumerLike,
        producer: ProducerLike,
        handled: Handled,
        messages: list[Message],
    ) -> tuple[ProducerLike, bool]:
        """Produce the outputs and commit them with the offsets; on failure abort and rewind.

        An output the producer refuses (too large) or the broker rejects is replaced by the
        loop's own small dead letter and the transaction tried again at once (without handling
        the batch again): nothing a handler returns can stall a partition. Returns the producer
        to use next (a new one when this one cannot go on) and whether the transaction was
        committed.
        """
        outputs = list(handled.outputs)
        alone: set[int] = set()
        """Outputs rejected in a request with others: each is sent alone for its own verdict."""
        for _ in range(2 * len(outputs) + 1):  # each failed round replaces or isolates some
            rejected: dict[int, str] = {}
            try:
                self._produce_all(producer, outputs, alone, rejected)
                producer.send_offsets_to_transaction(
                    self._owned_offsets(messages),
                    consumer.consumer_group_metadata(),
                    self.settings.kafka_timeout_seconds,
                )
                self._commit(producer)
                return producer, True
            except KafkaException as exc:
                error = exc.args[0]
                log.warning(
                    "%s: transaction failed (%s); %s %d message(s)",
                    self.handler.name, error.str(),
                    "retrying" if rejected else "rewinding", len(messages),
                )  # fmt: skip
                producer = self._abort(producer, error)
                if not rejected:
                    break
                # The rejected records took sequence numbers the broker never stored: the
                # producer's next transaction would fail (OUT_OF_ORDER_SEQUENCE_NUMBER).
                _close_quietly(producer)
                producer = self._new_producer()
                # A request is rejected whole: only an output sent alone, or rejected alone,
                # is known to be the one at fault; the others are tried alone next time.
                guilty = {i for i in rejected if i in alone or len(rejected) == 1}
                for index in guilty:
                    outputs[index] = self._unproducible(outputs[index], rejected[index])
                alone = (alone | set(rejected)) - guilty
        self._rewind(consumer, messages)
        time.sleep(0.5)
        return producer, False

    def _produce_all(
        self,
        producer: ProducerLike,
        outputs: list[Output],
        alone: set[int],
        rejected: dict[int, str],
    ) -> None:
        """Begin the transaction and produce ``outputs`` (replacing those refused at once);
        the ``alone`` ones each in a request of its own."""
        producer.begin_transaction()
        timeout = self.settings.kafka_timeout_seconds
        for index, out in enumerate(outputs):
            if index in alone:
                producer.flush(timeout)
            outputs[index] = self._produce(producer, out, rejected, index)
            if index in alone:
                producer.flush(timeout)
                if index in rejected:
                    raise KafkaException(
                        KafkaError(KafkaError._STATE, rejected[index], txn_requires_abort=True)
                    )

    def _owned_offsets(self, messages: Sequence[Message]) -> list[TopicPartition]:
        """The offsets to commit after ``messages``, for the partitions still owned."""
        owned = self._owned
        return [tp for tp in _next_offsets(messages) if (tp.topic, tp.partition) in owned]

    def _abort(self, producer: ProducerLike, error: KafkaError) -> ProducerLike:
        """Abort the failed transaction; a producer that cannot is replaced."""
        if error.txn_requires_abort():
            try:
                producer.poll(0)  # serve the delivery reports that name rejected outputs
                producer.abort_transaction(self.settings.kafka_timeout_seconds)
                return producer
            except KafkaException as abort_exc:
                log.warning("%s: abort failed: %s", self.handler.name, abort_exc)
        return self._new_producer()

    def _produce(
        self, producer: ProducerLike, out: Output, rejected: dict[int, str], index: int
    ) -> Output:
        """Produce ``out`` (or, if it is refused, its dead letter); returns what was produced.

        A rejection by the broker comes later, in the delivery report: it is noted in
        ``rejected`` under ``index`` and fails the transaction."""

        def delivered(error: KafkaError | None, _: Message) -> None:
            if error is not None and error.code() in UNPRODUCIBLE:
                rejected[index] = f"rejected by the broker: {error.str()}"

        replaced = False
        while True:
            try:
                producer.produce(
                    out.topic, out.value, out.key, headers=out.headers, on_delivery=delivered
                )
                return out
            except BufferError:
                producer.poll(0.05)
            except KafkaException as exc:
                if exc.args[0].code() not in UNPRODUCIBLE or replaced:
                    raise  # not about this record, or even its small dead letter is refused
                limit = self._producer_config.get("message.max.bytes", 1_000_000)
                out = self._unproducible(out, f"{_size(out)} bytes > limit {limit}")
                replaced = True

    def _unproducible(self, out: Output, why: str) -> Output:
        """The loop's last-resort dead letter of an output that cannot be produced: the reason,
        the source position, the original's topic, size and sha256 digest; no payload."""
        value = out.value or b""
        source = out.source or dead_letter_source(out.headers)
        reason = f"output too large or rejected: {why}"
        earlier = header_map(out.headers).get(H_REASON)
        if earlier:
            reason += f"; it was a dead letter: {earlier}"
        headers: Headers = (
            dead_letter_headers(reason, source) if source is not None else [(H_REASON, reason)]
        )
        headers += [
            (H_ORIGINAL_TOPIC, out.topic),
            (H_ORIGINAL_SIZE, str(len(value))),
            (H_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest()),
        ]
        log.error(
            "%s: an output to %s from %s cannot be produced (%s); dead-lettered without its "
            "payload", self.handler.name, out.topic, source or "an unknown source", why,
        )  # fmt: skip
        self.stats.unproducible += 1
        return Output(self.settings.dlq_topic, None, key=out.key, headers=headers, source=source)

    def _commit(self, producer: ProducerLike) -> None:
        for attempt in range(5):
            try:
                self._watchdog.check()  # a step hung past its deadline: never commit after it
                producer.commit_transaction(self.settings.kafka_timeout_seconds)
                return
            except KafkaException as exc:
                if not exc.args[0].retriable() or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def _rewind(self, consumer: ConsumerLike, messages: Sequence[Message]) -> None:
        """Seek back to the batch's first offsets (partitions still ours) to redo it."""
        self.stats.rewinds += 1
        for tp in _first_offsets(messages):
            if (tp.topic, tp.partition) not in self._owned:
                continue
            try:
                consumer.seek(tp)
            except KafkaException as exc:
                log.warning("%s: cannot rewind %s: %s", self.handler.name, tp, exc)

    def _handler_deadline(self) -> AbstractContextManager[None]:
        return self._watchdog.deadline(
            f"the {self.handler.name}'s handler", self.settings.handler_timeout_seconds
        )

    def _handle_with_retries(self, consumer: ConsumerLike) -> tuple[Handled, list[Message]] | None:
        """The handler's result and the messages it covers (those of the batch in hand whose
        partitions are still ours); None when the batch must be dropped (stopping, or every
        partition of it revoked while it waited to be retried).

        Whichever way the batch ends, the partitions paused meanwhile are resumed: after a
        success the circuit is closed, and a dropped batch is read again from its owner's
        committed offsets.
        """
        try:
            return self._handle_paused(consumer)
        finally:
            self._resume(consumer)

    def _handle_paused(self, consumer: ConsumerLike) -> tuple[Handled, list[Message]] | None:
        breaker = self.handler.breaker
        failures = 0
        while True:
            messages = list(self._in_hand)  # a wait may have dropped some (revoked)
            if not messages:
                return None
            try:
                with self._handler_deadline():
                    handled = self.handler.handle(messages)
                breaker.succeeded()
                return handled, messages
            except TransientError as exc:
                delay = breaker.failed(exc)
                self._pause(consumer, consumer.assignment())
                if not self._wait(consumer, delay):
                    return None
            except Exception as exc:
                failures += 1
                log.error(
                    "%s: batch failed (attempt %d): %s",
                    self.handler.name, failures, exc,
                )  # fmt: skip
                if failures < self.settings.max_attempts:
                    if not self._wait(consumer, 0.2 * failures):
                        return None
                    continue
                alone = self._one_by_one(messages)
                return None if alone is None else (alone, messages)

    def _one_by_one(self, messages: list[Message]) -> Handled | None:
        """Handle each message alone; dead-letter those that still fail."""
        merged = Handled(outputs=[])
        hooks: list[Callable[[], None]] = []
        for message in messages:
            for attempt in range(1, self.settings.max_attempts + 1):
                try:
                    with self._handler_deadline():
                        handled = self.handler.handle([message])
                except TransientError as exc:
                    self.handler.breaker.failed(exc)
                    return None  # redo the whole batch once the outage is over
                except Exception as exc:
                    if attempt < self.settings.max_attempts:
                        continue
                    reason = f"failed {attempt} times: {type(exc).__name__}: {exc}"
                    log.error("%s: dead-lettering %s[%s]@%s: %s\n%s",
                        self.handler.name, message.topic(), message.partition(),
                        message.offset(), reason, traceback.format_exc(limit=3),
                    )  # fmt: skip
                    try:
                        letter = self.handler.dead_letter(message, reason, attempt)
                    except TransientError as dead_letter_exc:
                        # The handler keeps dead letters' originals (MongoDB): an outage.
                        self.handler.breaker.failed(dead_letter_exc)
                        return None  # redo the whole batch once the outage is over
                    merged.outputs.append(letter)
                    merged.counts["dead_lettered"] += 1
                    break
                self.handler.breaker.succeeded()
                merged.outputs += handled.outputs
                merged.counts.update(handled.counts)
                if handled.on_commit:
                    hooks.append(handled.on_commit)
                break

        def run_hooks() -> None:
            for hook in hooks:
                hook()

        merged.on_commit = run_hooks
        return merged

    def _wait(self, consumer: ConsumerLike, delay: float) -> bool:
        """Sleep ``delay`` while serving the group; False if asked to stop meanwhile.

        A revocation served here removes the revoked partitions' messages from the batch in
        hand (``_on_revoke``)."""
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self._stop.is_set():
                return False
            # Paused partitions return nothing; newly assigned ones could, so rewind those.
            message = consumer.poll(0.1)
            if message is not None and message.error() is None:
                s = source_of(message)
                consumer.seek(TopicPartition(s.topic, s.partition, s.offset))
                self._pause(consumer, [TopicPartition(s.topic, s.partition)])
        return True
