"""The consume loop's failure paths, with in-memory Kafka clients injected (``kafka_fakes``).

The handler here echoes each input as one output on ``out`` and can be scripted to fail; the
loops' real runs against Kafka are covered by the integration and chaos suites.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stockflow.config import Settings
from stockflow.consumer import Handled, Output, TransactionalLoop
from stockflow.deadletters import dead_letter_headers, header_map
from stockflow.errors import AccessDeniedError, TransientError
from stockflow.outcomes import source_of
from stockflow.retry import Backoff, CircuitBreaker, CircuitState
from stockflow.watchdog import EXIT_STUCK
from tests.unit.kafka_fakes import FakeKafka, abortable

IN = "in"


class EchoHandler:
    """Outputs each input's value on ``out``; ``fail(messages)`` may raise instead."""

    name = "echo"

    def __init__(self, fail: Callable[[Sequence[Any]], None] | None = None) -> None:
        self.breaker = CircuitBreaker("echo", backoff=Backoff(base=0.02, cap=0.05))
        self.fail = fail
        self.calls: list[list[tuple[int, int]]] = []
        self.committed: list[int] = []

    def handle(self, messages: Sequence[Any]) -> Handled:
        self.calls.append([(m.partition(), m.offset()) for m in messages])
        if self.fail is not None:
            self.fail(messages)
        n = len(messages)
        return Handled(
            [Output("out", m.value(), source=source_of(m)) for m in messages],
            on_commit=lambda: self.committed.append(n),
        )

    def dead_letter(self, message: Any, reason: str, attempts: int) -> Output:
        headers = dead_letter_headers(reason, source_of(message), attempts=attempts)
        return Output("dlq", message.value(), headers=headers)


def make_loop(kafka: FakeKafka, handler: EchoHandler, **settings: Any) -> TransactionalLoop:
    s = Settings(
        **{
            "batch_size": 100,
            "max_attempts": 3,
            "kafka_timeout_seconds": 1,
            "dlq_topic_name": "dlq",
            **settings,
        }
    )
    loop = TransactionalLoop(
        s,
        handler,
        topics=[IN],
        group_id="g",
        consumer_factory=kafka.consumer,
        producer_factory=kafka.producer,
    )
    loop.on_stuck = lambda what: pytest.fail(f"unexpected watchdog: {what}")
    return loop


class Running:
    """A loop running in a thread; ``until`` waits for a condition, then stops it."""

    def __init__(self, loop: TransactionalLoop, **run: Any) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, kwargs=run, daemon=True)
        self.thread.start()

    def _run(self, **run: Any) -> None:
        try:
            self.loop.run(**run)
        except BaseException as exc:
            self.error = exc

    def until(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        try:
            while not condition():
                if self.error is not None or not self.thread.is_alive():
                    break
                assert time.monotonic() < deadline, "condition not reached in time"
                time.sleep(0.005)
        finally:
            self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the loop did not stop"


def committed_everything(kafka: FakeKafka) -> Callable[[], bool]:
    return lambda: all(kafka.committed.get(key, 0) == len(log) for key, log in kafka.logs.items())


# --- transient failures: the circuit ---
def test_a_transient_failure_pauses_keeps_polling_and_resumes_on_success() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b")
    kafka.add(IN, 1, b"c")
    failures = iter([TransientError("db down")] * 4)

    def fail(_: Sequence[Any]) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    handler = EchoHandler(fail)
    loop = make_loop(kafka, handler)
    Running(loop).until(committed_everything(kafka))
    [consumer] = kafka.consumers
    assert len(handler.calls) == 5  # the same batch, retried until the dependency answers
    assert consumer.polls_while_paused >= 4  # the group membership was kept meanwhile
    assert consumer.paused == set() and handler.breaker.state is CircuitState.CLOSED
    assert sorted(kafka.values()) == [b"a", b"b", b"c"]  # once each, no dead letter


# --- failures about the messages: retries, one by one, dead letters ---
def test_a_poison_message_is_dead_lettered_after_bounded_retries_and_its_neighbours_kept() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"poison", b"c")
    kafka.add(IN, 1, b"d")

    def fail(messages: Sequence[Any]) -> None:
        if any(m.value() == b"poison" for m in messages):
            raise ValueError("cannot handle poison")

    handler = EchoHandler(fail)
    Running(make_loop(kafka, handler, max_attempts=3)).until(committed_everything(kafka))
    batch = handler.calls[0]
    assert handler.calls[:3] == [batch] * 3  # bounded retries of the batch
    after = handler.calls[3:]  # then halves, down to the poison alone, tried 3 times
    assert after.count([(0, 1)]) == 3
    passed = [p_o for call in after if (0, 1) not in call for p_o in call]
    assert sorted(passed) == [(0, 0), (0, 2), (1, 0)]  # each neighbour handled once more
    assert sorted(kafka.values("out")) == [b"a", b"c", b"d"]
    [letter] = [o for o in kafka.outputs if o.topic == "dlq"]
    headers = header_map(letter.headers)
    assert letter.value == b"poison" and "cannot handle poison" in headers["stockflow.dlq.reason"]
    assert headers["stockflow.dlq.source.offset"] == "1"
    assert headers["stockflow.dlq.attempts"] == "3"
    assert len(kafka.commits) == 1  # one transaction: outputs, the dead letter and offsets


class StoreDownOnce(EchoHandler):
    """Its dead letters need a store (the handlers keep originals in MongoDB), down at first."""

    def __init__(self, fail: Callable[[Sequence[Any]], None]) -> None:
        super().__init__(fail)
        self.store_down = 1

    def dead_letter(self, message: Any, reason: str, attempts: int) -> Output:
        if self.store_down:
            self.store_down -= 1
            raise TransientError("MongoDB: cannot keep dead letters")
        return super().dead_letter(message, reason, attempts)


def test_a_dead_letter_whose_store_is_down_waits_like_any_outage() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"poison", b"c")

    def fail(messages: Sequence[Any]) -> None:
        if any(m.value() == b"poison" for m in messages):
            raise ValueError("cannot handle poison")

    handler = StoreDownOnce(fail)
    Running(make_loop(kafka, handler, max_attempts=2)).until(committed_everything(kafka))
    assert handler.store_down == 0  # the loop survived the failed dead letter and redid the batch
    assert sorted(kafka.values("out")) == [b"a", b"c"]
    assert [o.value for o in kafka.outputs if o.topic == "dlq"] == [b"poison"]


def test_a_configuration_error_stops_the_loop_and_dead_letters_nothing() -> None:
    """A rotated password makes every batch fail: no message is at fault, so none may be
    dead-lettered (before: 5 of 5 valid messages were); the loop stops with the error."""
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b", b"c", b"d", b"e")

    def fail(_: Sequence[Any]) -> None:
        raise AccessDeniedError("MongoDB refused stockflow's credentials")

    handler = EchoHandler(fail)
    loop = make_loop(kafka, handler)
    with pytest.raises(AccessDeniedError):
        loop.run(idle_timeout=2)
    assert kafka.outputs == [] and kafka.commits == []
    assert len(handler.calls) == 1  # not retried, not handled one by one
    assert kafka.consumers[0].closed


def test_poison_is_isolated_by_halving_in_a_few_calls_and_the_group_is_served_between() -> None:
    """A failing batch of 64 is split in halves, not handled one by one (before: 64 single
    calls, none of which polled Kafka: 5,000 of them could pass max.poll.interval.ms)."""
    kafka = FakeKafka()
    values = [f"m{i}".encode() for i in range(64)]
    values[37] = b"poison"
    kafka.add(IN, 0, *values)
    polls: list[int] = []

    def fail(messages: Sequence[Any]) -> None:
        polls.append(kafka.consumers[0].polls)
        if any(m.value() == b"poison" for m in messages):
            raise ValueError("cannot handle poison")

    handler = EchoHandler(fail)
    Running(make_loop(kafka, handler, max_attempts=3)).until(committed_everything(kafka))
    after = handler.calls[3:]
    assert len(after) <= 2 * 6 + 2, len(after)  # two halves a level, log2(64) levels, retries
    assert sorted(kafka.values("out")) == sorted(v for v in values if v != b"poison")
    assert [o.value for o in kafka.outputs if o.topic == "dlq"] == [b"poison"]
    assert all(a < b for a, b in itertools.pairwise(polls[2:])), polls  # served


def test_two_poison_messages_are_both_dead_lettered_and_the_rest_kept_in_order() -> None:
    kafka = FakeKafka()
    values = [f"m{i}".encode() for i in range(10)]
    values[2] = values[7] = b"poison"
    kafka.add(IN, 0, *values)

    def fail(messages: Sequence[Any]) -> None:
        if any(m.value() == b"poison" for m in messages):
            raise ValueError("cannot handle poison")

    Running(make_loop(kafka, EchoHandler(fail))).until(committed_everything(kafka))
    assert kafka.values("out") == [v for v in values if v != b"poison"]
    assert kafka.values("dlq") == [b"poison", b"poison"] and len(kafka.commits) == 1


# --- transactions ---
def test_a_failed_transaction_is_aborted_and_the_batch_rewound_and_redone() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b")
    kafka.add(IN, 1, b"c")
    kafka.producer_script = lambda p: p.fail_commit.append(abortable("coordinator moved"))
    handler = EchoHandler()
    loop = make_loop(kafka, handler)
    Running(loop).until(committed_everything(kafka))
    [producer] = kafka.producers
    [consumer] = kafka.consumers
    assert producer.aborts == 1
    assert sorted(consumer.seeks) == [(IN, 0, 0), (IN, 1, 0)]  # back to the first offsets
    assert handler.calls[0] == handler.calls[1]  # the same batch, handled again
    assert sorted(kafka.values()) == [b"a", b"b", b"c"]  # only the redone attempt's outputs
    assert handler.committed == [3] and loop.stats.rewinds == 1


def test_an_abort_that_fails_gets_a_new_producer() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")

    def script(p: Any) -> None:
        if not kafka.producers:  # the first producer: commit and abort both fail
            p.fail_commit.append(abortable())
            p.fail_abort.append(KafkaException(KafkaError(KafkaError._TIMED_OUT, "abort")))

    kafka.producer_script = script
    Running(make_loop(kafka, EchoHandler())).until(committed_everything(kafka))
    assert len(kafka.producers) == 2
    assert kafka.values() == [b"a"]


# --- pause and resume ---
def test_partitions_paused_while_waiting_to_retry_are_resumed_whatever_the_batch_became() -> None:
    """A rebalance while a failed batch waits to be retried: the partitions that arrive are
    paused and rewound; they must be resumed once that batch is over (here: dropped)."""
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b")
    kafka.add(IN, 1, b"c")
    failures = iter([ValueError("flaky")] * 2)

    def fail(_: Sequence[Any]) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    everything = [(IN, 0), (IN, 1)]
    kafka.on_poll = [lambda c: None, lambda c: None, lambda c: c.rebalance(everything, everything)]
    handler = EchoHandler(fail)
    loop = make_loop(kafka, handler)
    Running(loop).until(committed_everything(kafka))
    [consumer] = kafka.consumers
    assert consumer.paused == set() and loop.paused == []
    assert set(kafka.values()) == {b"a", b"b", b"c"}


def test_health_says_paused_only_while_the_circuit_is_open() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    kafka.add(IN, 1, b"b")
    release = threading.Event()
    seen: list[tuple[CircuitState, list[str]]] = []
    loop: TransactionalLoop

    def fail(_: Sequence[Any]) -> None:
        seen.append((handler.breaker.state, loop.paused))
        if not release.is_set():
            raise TransientError("db down")

    handler = EchoHandler(fail)
    loop = make_loop(kafka, handler)
    running = Running(loop)
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen[-1] == (CircuitState.OPEN, [f"{IN}[0]", f"{IN}[1]"])
    release.set()
    running.until(committed_everything(kafka))
    assert (handler.breaker.state, loop.paused) == (CircuitState.CLOSED, [])


# --- revoked means revoked ---
def _held(kafka: FakeKafka, rebalance: Callable[[Any], None], hold_ms: int = 200) -> Any:
    """Two partitions in hand, the router-style hold filling the batch, and a rebalance
    served by the hold's first consume call."""
    kafka.add(IN, 0, b"a", b"b")
    kafka.add(IN, 1, b"c")
    kafka.on_poll = [lambda c: None, lambda c: None, rebalance]
    handler = EchoHandler()
    loop = make_loop(kafka, handler)
    loop.hold, loop.hold_ms = (lambda: True), hold_ms
    return loop, handler


def test_messages_of_a_partition_revoked_while_the_batch_fills_are_not_handled() -> None:
    kafka = FakeKafka()
    loop, handler = _held(kafka, lambda c: c.rebalance([(IN, 1)], []))  # p1 went to another
    Running(loop).until(lambda: kafka.committed.get((IN, 0)) == 2)
    assert all((1, 0) not in call for call in handler.calls)
    assert kafka.values() == [b"a", b"b"]
    assert all((IN, 1) not in offsets for offsets in kafka.commits)


def test_a_partition_revoked_and_assigned_again_is_read_again_not_twice() -> None:
    kafka = FakeKafka()
    everything = [(IN, 0), (IN, 1)]
    loop, handler = _held(kafka, lambda c: c.rebalance(everything, everything))
    Running(loop).until(committed_everything(kafka))
    assert sorted(kafka.values()) == [b"a", b"b", b"c"]  # each once: the stale copies dropped
    assert sorted(p_o for call in handler.calls for p_o in call) == [(0, 0), (0, 1), (1, 0)]


def test_a_batch_whose_partitions_were_all_revoked_is_dropped_without_committing() -> None:
    kafka = FakeKafka()
    loop, handler = _held(kafka, lambda c: c.rebalance([(IN, 0), (IN, 1)], []))
    Running(loop).until(lambda: bool(kafka.consumers) and kafka.consumers[0].polls > 20)
    assert handler.calls == [] and kafka.commits == [] and kafka.outputs == []


def test_a_partition_revoked_while_a_failed_batch_waits_leaves_the_rest_of_the_batch() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b")
    kafka.add(IN, 1, b"c")
    failures = iter([TransientError("db down")])

    def fail(_: Sequence[Any]) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    kafka.on_poll = [lambda c: None, lambda c: None, lambda c: c.rebalance([(IN, 1)], [])]
    handler = EchoHandler(fail)
    Running(make_loop(kafka, handler)).until(lambda: kafka.committed.get((IN, 0)) == 2)
    assert handler.calls[-1] == [(0, 0), (0, 1)]
    assert kafka.values() == [b"a", b"b"] and all((IN, 1) not in c for c in kafka.commits)


# --- bounded runs ---
def test_a_bounded_run_stops_after_that_many_committed_messages() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b", b"c")
    kafka.add(IN, 1, b"d", b"e")
    loop = make_loop(kafka, EchoHandler())
    stats = loop.run(max_messages=3)
    assert stats.messages == 3 and len(kafka.values()) == 3
    assert sum(kafka.committed.values()) == 3  # nothing beyond the bound was committed
    [consumer] = kafka.consumers
    assert consumer.closed


# --- every call has a deadline ---
class Hanging(EchoHandler):
    """A handler whose call hangs (a MongoDB call on a half-open connection) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def handle(self, messages: Sequence[Any]) -> Handled:
        self.entered.set()
        self.release.wait(30)
        return super().handle(messages)


def _stuck_loop(kafka: FakeKafka, handler: EchoHandler, **settings: Any) -> tuple[Any, list[str]]:
    loop = make_loop(kafka, handler, **settings)
    stuck: list[str] = []
    loop.on_stuck = stuck.append
    return loop, stuck


def _wait_for(condition: Callable[[], bool], timeout: float) -> float:
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, "not reached in time"
        time.sleep(0.01)
    return time.monotonic() - began


def test_a_hung_handler_call_ends_the_worker_and_nothing_of_its_batch_is_committed() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    handler = Hanging()
    loop, stuck = _stuck_loop(kafka, handler, handler_timeout_seconds=0.3)
    running = Running(loop)
    _wait_for(lambda: bool(stuck), 5)
    assert "handler" in stuck[0] and "0.3s" in stuck[0]
    handler.release.set()  # the call returns after all: too late, the batch was given up
    running.thread.join(5)
    assert not running.thread.is_alive() and running.error is None
    assert kafka.commits == [] and kafka.outputs == []


def test_a_stop_during_a_hung_call_ends_the_worker_within_the_grace_period() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    handler = Hanging()
    loop, stuck = _stuck_loop(kafka, handler, stop_grace_seconds=0.5)
    running = Running(loop)
    assert handler.entered.wait(5)
    loop.stop()
    took = _wait_for(lambda: bool(stuck), 15)
    # Not before the grace period; well within it plus scheduling slack on a loaded machine.
    assert 0.45 < took < 8 and "asked to stop" in stuck[0]
    handler.release.set()
    running.thread.join(5)
    assert kafka.commits == [] and kafka.outputs == []


class Busy(EchoHandler):
    """A slow but healthy handler: ``steps`` steps of ``step`` seconds, each reporting
    progress (as the applier does after each MongoDB step)."""

    def __init__(self, steps: int, step: float) -> None:
        super().__init__()
        self.steps, self.step = steps, step
        self.progress: Callable[[], None] = lambda: None
        self.entered = threading.Event()

    def handle(self, messages: Sequence[Any]) -> Handled:
        self.entered.set()
        for _ in range(self.steps):
            time.sleep(self.step)
            self.progress()
        return super().handle(messages)


def test_a_slow_batch_that_makes_progress_is_not_taken_for_a_hung_call() -> None:
    """The handler's deadline is a "no progress" deadline: a batch taking 4x longer than it,
    reporting progress, is committed (before: the watchdog fired, exit 75, the same batch
    again after the restart: a crash loop)."""
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b")
    handler = Busy(steps=12, step=0.1)
    loop, stuck = _stuck_loop(kafka, handler, handler_timeout_seconds=0.3)
    handler.progress = loop.progress
    Running(loop).until(committed_everything(kafka), timeout=20)
    assert stuck == [] and kafka.values() == [b"a", b"b"]


def test_a_stop_lets_a_batch_that_makes_progress_finish() -> None:
    """The grace period after a stop counts from the last progress: a healthy batch longer
    than it is finished and committed (before: abandoned with exit 75)."""
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    handler = Busy(steps=12, step=0.1)
    loop, stuck = _stuck_loop(kafka, handler, stop_grace_seconds=0.3)
    handler.progress = loop.progress
    running = Running(loop)
    assert handler.entered.wait(5)
    running.stop()
    assert stuck == [] and kafka.values() == [b"a"] and kafka.committed == {(IN, 0): 1}


def test_a_hung_transaction_step_ends_the_worker() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    release = threading.Event()
    kafka.producer_script = lambda p: p.hang.update(send_offsets_to_transaction=release)
    loop, stuck = _stuck_loop(kafka, EchoHandler())
    loop.kafka_call_seconds = 0.3
    running = Running(loop)
    _wait_for(lambda: bool(stuck), 5)
    assert "Kafka transaction" in stuck[0]
    release.set()
    running.thread.join(5)
    assert kafka.commits == []


def _kafka_outage(kafka: FakeKafka, seconds: float) -> Callable[[], bool]:
    """Kafka away for ``seconds`` from the first transaction: every call that talks to the
    broker fails fast (as librdkafka's do with a short timeout). Returns "is it over?"."""
    began: list[float] = []

    def fault(step: str) -> BaseException | None:
        if step == "send_offsets_to_transaction" and not began:
            began.append(time.monotonic())
        if began and time.monotonic() - began[0] < seconds:
            time.sleep(0.05)
            return KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down", retriable=True))
        return None

    kafka.producer_script = lambda p: setattr(p, "fault", fault)
    return lambda: bool(began) and time.monotonic() - began[0] >= seconds


def test_a_kafka_outage_longer_than_a_calls_deadline_is_waited_out() -> None:
    """Each blocking Kafka call has its own deadline; waiting for a new producer has none
    (before: one deadline covered the transaction, the retries and the wait for a producer,
    and a 20 s outage with a 1 s Kafka timeout fired the watchdog at 13.4 s)."""
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", b"b")
    over = _kafka_outage(kafka, 2.5)
    handler = EchoHandler()
    loop, stuck = _stuck_loop(kafka, handler)
    loop.kafka_call_seconds = 1.0  # each call fails fast; the outage lasts 2.5 of them
    Running(loop).until(committed_everything(kafka), timeout=30)
    assert stuck == [] and over()
    assert kafka.values() == [b"a", b"b"]  # once each: the failed attempts were aborted
    assert len(kafka.producers) >= 2  # the producer was replaced after the failed abort


def test_a_stop_while_waiting_out_a_kafka_outage_returns_at_once() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    _kafka_outage(kafka, 60)
    loop, stuck = _stuck_loop(kafka, EchoHandler())
    loop.kafka_call_seconds = 1.0
    running = Running(loop)
    _wait_for(lambda: len(kafka.producers) >= 2, 10)  # waiting for a new producer
    time.sleep(0.5)
    began = time.monotonic()
    running.stop()
    # The outage lasts 60 s: returning well within it is the point, not a speed figure.
    assert time.monotonic() - began < 20 and stuck == [] and kafka.commits == []


def test_sigterm_ends_a_worker_process_whose_handler_hangs(tmp_path: Path) -> None:
    """The real exit: a process running the loop gets SIGTERM while its handler hangs."""
    script = tmp_path / "hang.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, sys, threading
            from stockflow.config import Settings
            from stockflow.consumer import TransactionalLoop
            from tests.unit.kafka_fakes import FakeKafka
            from tests.unit.test_consumer import Hanging

            kafka = FakeKafka()
            kafka.add("in", 0, b"a")
            handler = Hanging()
            handler.release = threading.Event()  # never set
            loop = TransactionalLoop(
                Settings(stop_grace_seconds=1), handler, topics=["in"], group_id="g",
                consumer_factory=kafka.consumer, producer_factory=kafka.producer,
            )
            signal.signal(signal.SIGTERM, lambda *_: loop.stop())
            threading.Thread(target=loop.run, daemon=True).start()
            handler.entered.wait(10)
            print("hung", flush=True)
            while True:
                signal.pause()
            """
        )
    )
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    with subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"hung\n"
            began = time.monotonic()
            child.send_signal(signal.SIGTERM)
            _, stderr = child.communicate(timeout=10)
            took = time.monotonic() - began
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert child.returncode == EXIT_STUCK and took < 5, (child.returncode, took, stderr)
    assert b"asked to stop" in stderr


# --- outputs that cannot be produced ---
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Broker: Message size too large")


def _too_large_letter(kafka: FakeKafka, big: bytes, offset: int) -> None:
    [letter] = [o for o in kafka.outputs if o.topic == "dlq"]
    headers = header_map(letter.headers)
    assert letter.value is None  # nothing of the payload: it is what did not fit
    assert "too large" in headers["stockflow.dlq.reason"]
    assert headers["stockflow.dlq.original.size"] == str(len(big))
    assert headers["stockflow.dlq.original.sha256"] == hashlib.sha256(big).hexdigest()
    assert headers["stockflow.dlq.original.topic"] == "out"
    assert (headers["stockflow.dlq.source.topic"], headers["stockflow.dlq.source.offset"]) == (
        IN,
        str(offset),
    )


def test_an_output_too_large_to_produce_becomes_a_small_dead_letter_and_its_neighbours_pass() -> (
    None
):
    big = b"x" * 5000
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", big, b"c")
    kafka.producer_script = lambda p: setattr(
        p, "fail_produce", lambda t, v: KafkaException(TOO_LARGE) if len(v or b"") > 1000 else None
    )
    handler = EchoHandler()
    Running(make_loop(kafka, handler)).until(committed_everything(kafka), timeout=5)
    assert kafka.values("out") == [b"a", b"c"] and len(kafka.commits) == 1
    _too_large_letter(kafka, big, 1)
    assert len(handler.calls) == 1  # not handled again: the transaction went through at once


def test_an_output_the_broker_rejects_becomes_a_dead_letter_and_its_neighbours_pass() -> None:
    big = b"y" * 5000
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a", big, b"c")
    kafka.producer_script = lambda p: setattr(
        p, "delivery_errors", lambda out: TOO_LARGE if out.value == big else None
    )
    handler = EchoHandler()
    Running(make_loop(kafka, handler)).until(committed_everything(kafka), timeout=5)
    assert kafka.values("out") == [b"a", b"c"] and len(kafka.commits) == 1
    # All three rejected together, then each alone; a producer with rejected records is
    # replaced (its sequence numbers went astray).
    assert [p.aborts for p in kafka.producers] == [1, 1, 0]
    assert len(handler.calls) == 1  # the same outputs tried again, not the batch handled again
    _too_large_letter(kafka, big, 1)
