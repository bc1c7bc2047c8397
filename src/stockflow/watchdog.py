"""Every call the consume loop makes has a deadline; a call that outlives it ends the process.

Some calls cannot be interrupted from Python: librdkafka's ``send_offsets_to_transaction``
can block forever, past its own timeout, when the group coordinator went away (librdkafka
issues #5456 and #5511, open), and a MongoDB or Redis call can hang on a half-open connection
or a server that stopped answering. The loop arms a :meth:`Watchdog.deadline` around each such
call (the handler, each blocking Kafka call); a thread checks them. A deadline counts time
without progress, not time: the work reports each step it finishes (:meth:`Watchdog.touch`;
the applier does after each MongoDB step), so a slow but healthy batch is never taken for a
hung one. When a deadline passes with no progress -- or when a stop was asked and the call in
hand made no progress for a grace period -- it calls ``on_stuck``, which by default exits the
process with :data:`EXIT_STUCK`. Nothing of the
batch in hand was committed, so its next owner (a fresh worker started by ``stockflow
consume``'s supervisor, or another member) redoes it idempotently.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_STUCK = 75
"""Exit status of a worker a call of which hung (EX_TEMPFAIL: restart it)."""


def exit_stuck(what: str) -> None:
    """End the process now: the hung call cannot be interrupted, and nothing was committed.

    Says why with one best-effort, non-blocking write to stderr and exits: never through
    ``logging``, whose handler lock a hung log write (stderr a pipe nobody reads) may hold.
    """
    line = f"{what}: exiting (status {EXIT_STUCK}) so that a fresh worker takes over\n"
    try:
        os.set_blocking(2, False)
        os.write(2, line.encode(errors="replace"))
    except OSError:
        pass  # stderr closed or full: the exit status says it
    os._exit(EXIT_STUCK)


class CallAbandoned(BaseException):
    """The watchdog gave up on a call: drop the batch in hand, commit nothing.

    A BaseException so that no handler's ``except Exception`` can take it for a failure of the
    messages and dead-letter them. Raised only when ``on_stuck`` returned (tests): by default
    the process has already exited.
    """


class Watchdog:
    """Watches the calls armed with :meth:`deadline` from a thread of its own."""

    def __init__(
        self,
        name: str,
        *,
        on_stuck: Callable[[str], None] = exit_stuck,
        grace_seconds: float = 10.0,
        interval: float = 0.1,
    ) -> None:
        self.name = name
        self.on_stuck = on_stuck
        self.grace_seconds = grace_seconds
        self.interval = interval
        self.fired: str | None = None
        """Why the watchdog gave up, once it has."""
        self._armed: tuple[str, float, float] | None = None
        self._stop_asked: float | None = None
        self._progress = 0.0
        """When the work last made progress (``touch``, or a call under a deadline ended)."""
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()

    def stopping(self) -> None:
        """A stop was asked: a call that makes no progress for ``grace_seconds`` from now on is
        abandoned (a batch that keeps making progress is let finish)."""
        if self._stop_asked is None:
            self._stop_asked = time.monotonic()

    def touch(self) -> None:
        """The work in hand made progress (a step of it finished): every deadline, and the
        grace period after a stop, count again from now. Any thread may call it."""
        self._progress = time.monotonic()

    @contextmanager
    def deadline(self, what: str, seconds: float) -> Iterator[None]:
        """Arm a deadline of ``seconds`` of no progress around the block (``what`` names the
        call): it fires when neither the block ended nor :meth:`touch` was called for that
        long. A block that ends is progress."""
        outer = self._armed  # deadlines nest: the outer one keeps counting
        self._armed = (what, time.monotonic(), seconds)
        try:
            yield
        finally:
            self._armed = outer
            if self.fired is not None:
                raise CallAbandoned(self.fired)  # whatever the block did, it is abandoned
            self.touch()

    def check(self) -> None:
        """Raise CallAbandoned if the watchdog gave up: call before any step that commits."""
        if self.fired is not None:
            raise CallAbandoned(self.fired)

    def _watch(self) -> None:
        while not self._closed.wait(self.interval):
            armed = self._armed
            if armed is None:
                continue
            what, since, limit = armed
            now = time.monotonic()
            progress = self._progress
            if now - max(since, progress) > limit:
                made = " with no progress" if progress > since else ""
                self._fire(f"{self.name}: {what} took over {limit:g}s{made}")
                return
            asked = self._stop_asked
            if asked is not None and now - max(asked, progress) > self.grace_seconds:
                self._fire(
                    f"{self.name}: asked to stop and {what} made no progress for "
                    f"{self.grace_seconds:g}s"
                )
                return

    def _fire(self, what: str) -> None:
        self.fired = what
        self.on_stuck(what)
