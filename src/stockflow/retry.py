"""Retrying transient failures: exponential backoff with full jitter, and a circuit breaker."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from enum import StrEnum

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Delays of ``base * 2**attempt`` capped at ``cap`` seconds, each drawn uniformly below."""

    base: float = 0.2
    cap: float = 5.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class CircuitState(StrEnum):
    """Whether a dependency is believed to work."""

    CLOSED = "closed"
    """Working: requests flow."""
    OPEN = "open"
    """Failing: work is paused and retried after a backoff delay."""


@dataclass
class CircuitBreaker:
    """Tracks one dependency: opens on a transient failure, closes on the next success."""

    name: str
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float | None = None
    last_error: str | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def failed(self, error: BaseException) -> float:
        """Record a failure; returns how long to wait before the next attempt."""
        self.failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if self.state is CircuitState.CLOSED:
            self.state = CircuitState.OPEN
            self.opened_at = time.monotonic()
            log.warning("%s: circuit open (%s); pausing and retrying", self.name, self.last_error)
        return self.backoff.next_delay()

    def succeeded(self) -> None:
        if self.state is CircuitState.OPEN:
            down = time.monotonic() - (self.opened_at or time.monotonic())
            log.warning(
                "%s: circuit closed after %.1fs and %d failure(s); resuming",
                self.name, down, self.failures,
            )  # fmt: skip
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = None
        self.backoff.reset()
