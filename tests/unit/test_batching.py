"""How a consumer loop gathers a batch: what has arrived, and more while the next stage is busy.

The consumer is a stand-in (batching is pure logic over poll/consume) on a virtual clock that
moves only when the loop waits, so no timing of the machine can change a result; the loops'
real runs are covered by the integration and chaos suites.
"""

from __future__ import annotations

import types
from collections import deque
from typing import Any

import pytest

from stockflow import consumer
from stockflow.config import Settings
from stockflow.consumer import Handled, Output, TransactionalLoop
from stockflow.retry import CircuitBreaker


class _Clock:
    """Virtual seconds; waiting (a consume with a timeout) is the only thing that moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    fake_time = types.SimpleNamespace(monotonic=c, perf_counter=c, time=c, sleep=c.sleep)
    monkeypatch.setattr(consumer, "time", fake_time)
    return c


class _Message:
    def __init__(self, offset: int) -> None:
        self.offset = offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0


class _Consumer:
    """Hands out messages that 'arrive' at given (virtual) times after the first poll."""

    def __init__(self, clock: _Clock, arrivals: list[float]) -> None:
        self.clock = clock
        self.start = 0.0
        self.pending = deque(enumerate(arrivals))

    def _arrived(self, limit: int) -> list[_Message]:
        now = self.clock() - self.start
        out = []
        while self.pending and self.pending[0][1] <= now and len(out) < limit:
            out.append(_Message(self.pending.popleft()[0]))
        return out

    def poll(self, timeout: float) -> _Message | None:
        self.start = self.clock()
        got = self._arrived(1)
        return got[0] if got else None

    def consume(self, limit: int, timeout: float) -> list[_Message]:
        got = self._arrived(limit)
        if not got and timeout:
            self.clock.sleep(timeout)
            got = self._arrived(limit)
        return got


class _Handler:
    name = "test"
    breaker = CircuitBreaker("test")

    def handle(self, messages: Any) -> Handled:
        return Handled(outputs=[])

    def dead_letter(self, message: Any, reason: str, attempts: int) -> Output:
        raise AssertionError("not reached")


def _loop(batch_size: int = 100) -> TransactionalLoop:
    loop = TransactionalLoop(
        Settings(batch_size=batch_size), _Handler(), topics=["t"], group_id="g"
    )
    loop._owned = {("t", 0)}  # the partition the stand-in serves is assigned to this member
    return loop


def _batch(loop: TransactionalLoop, consumer: _Consumer) -> list[int]:
    return [m.offset for m in loop._next_batch(consumer)]  # type: ignore[arg-type]


def test_without_a_hold_the_batch_is_what_has_arrived(clock: _Clock) -> None:
    loop = _loop()
    assert _batch(loop, _Consumer(clock, [0, 0, 0, 5.0])) == [0, 1, 2]


def test_while_the_next_stage_is_busy_the_batch_keeps_filling(clock: _Clock) -> None:
    loop = _loop()
    loop.hold, loop.hold_ms = (lambda: True), 200
    # Held long enough to take the two later arrivals, let go at hold_ms (not at 5 s).
    assert _batch(loop, _Consumer(clock, [0, 0, 0.02, 0.03, 5.0])) == [0, 1, 2, 3]
    assert clock.now - 1000.0 == pytest.approx(0.2, abs=0.01)


def test_the_hold_ends_as_soon_as_the_next_stage_is_free(clock: _Clock) -> None:
    loop = _loop()
    free_at = clock() + 0.3
    loop.hold, loop.hold_ms = (lambda: free_at > clock()), 60_000
    # Let go when the applier is free (0.3 s), long before hold_ms or the arrival at 5 s.
    assert _batch(loop, _Consumer(clock, [0, 0.01, 0.03, 5.0])) == [0, 1, 2]


def test_a_full_batch_is_never_held(clock: _Clock) -> None:
    loop = _loop(batch_size=3)
    asked: list[bool] = []
    loop.hold, loop.hold_ms = (lambda: asked.append(True) or True), 60_000
    assert _batch(loop, _Consumer(clock, [0, 0, 0, 0])) == [0, 1, 2]
    assert asked == []  # the hold was not even consulted
