"""Running workers as child processes: a pool, restarts with backoff, and no orphans.

``stockflow consume`` (supervised, the default) starts ``consume --no-supervise`` as a child
(``--workers N``: N children, each its own member of the consumer groups, so Kafka spreads the
partitions over them) and decides from each one's exit status what to do next (:func:`verdict`):

- 0: the worker finished (idle timeout, bounded run, SIGTERM): done;
- ``EXIT_CONFIG`` (78): its settings cannot work; restarting would fail the same way, so the
  supervisor gives up at once with one line;
- ``EXIT_TEMPFAIL`` (75: a service unreachable, a call that hung) or death by a signal (OOM
  killer, ``kill -9``): a fresh worker is started after a backoff (1 s doubling to 30 s, reset
  after a minute of good running);
- any other status (1: an error the worker already explained, such as a missing topic): passed on.

In a pool each worker is restarted on its own; one that gives up or fails for good stops the
others (they would meet the same fault), and the pool is done when every worker is.

The child never outlives its supervisor, whatever ends the supervisor (``kill -9`` included):
on Linux the kernel sends it SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), and
everywhere a thread watches the parent pid and does the same (:func:`die_with_parent`). SIGTERM
makes the worker finish or abandon its batch; if it has not ended 10 s later it exits anyway.
The child gets its settings, ``-v`` and ``--timestamps`` included, through the environment.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from stockflow.errors import EXIT_CONFIG, EXIT_TEMPFAIL, ServiceUnavailableError, TransientError
from stockflow.retry import Backoff

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 10.0
"""How long an orphaned worker may take to finish its batch after SIGTERM before it exits."""
HEALTHY_SECONDS = 60.0
"""A worker that ran this long before dying starts the backoff from the beginning again."""


class Verdict(StrEnum):
    """What the supervisor does after its worker exited."""

    DONE = "done"
    """Pass the status on and stop."""
    RESTART = "restart"
    """Start a fresh worker after a backoff."""
    GIVE_UP = "give up"
    """A configuration error: stop with a clear message."""


def verdict(status: int, *, stopping: bool) -> Verdict:
    """The supervisor's decision for a worker that exited with ``status`` (negative: the
    signal that killed it); ``stopping``: the supervisor itself was asked to stop."""
    if stopping:
        return Verdict.DONE
    if status == EXIT_CONFIG:
        return Verdict.GIVE_UP
    if status == EXIT_TEMPFAIL or status < 0:
        return Verdict.RESTART
    return Verdict.DONE


@dataclass
class _Slot:
    """One place in the pool: the worker running there (if any) and its restart schedule."""

    number: int
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=30.0))
    child: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    status: int | None = None
    """The worker's last exit status (negative: the signal that killed it)."""
    done: bool = False


def supervise(
    args: Sequence[str],
    *,
    say: Callable[[str], None],
    command: Sequence[str] | None = None,
    workers: int = 1,
) -> int:
    """Run ``workers`` processes of ``stockflow consume --no-supervise ARGS`` until they are
    done; returns 0 when every one finished well, else the first other status.

    Each worker is restarted on its own (after its own backoff) when :func:`verdict` says so.
    A worker that gives up (78) or fails for good (1) stops the whole pool: its siblings would
    meet the same fault. SIGTERM or SIGINT is passed to every worker, and nothing is restarted.
    """
    stopping = False
    slots = [_Slot(number) for number in range(1, workers + 1)]
    base = list(command or [sys.executable, "-m", "stockflow", "consume", "--no-supervise"])
    failed: int | None = None

    def signal_all(signum: int) -> None:
        for slot in slots:
            if slot.child is not None and slot.child.poll() is None:
                slot.child.send_signal(signum)

    def forward(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        signal_all(signum)

    def start(slot: _Slot) -> None:
        slot.restart_at = None
        slot.started = time.monotonic()
        slot.child = subprocess.Popen([*base, "--supervisor-pid", str(os.getpid()), *args])
        if stopping:  # the signal came while it was being started
            slot.child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for slot in slots:
        start(slot)
    while not all(slot.done for slot in slots):
        time.sleep(0.05)
        for slot in slots:
            if slot.done:
                continue
            if slot.child is None:  # waiting to be restarted
                if stopping or failed is not None:
                    slot.done = True
                elif slot.restart_at is not None and time.monotonic() >= slot.restart_at:
                    start(slot)
                continue
            status = slot.child.poll()
            if status is None:
                continue
            slot.child, slot.status = None, status
            who = _name(slot, workers)
            decision = verdict(status, stopping=stopping or failed is not None)
            if decision is Verdict.RESTART:
                if time.monotonic() - slot.started > HEALTHY_SECONDS:
                    slot.backoff.reset()
                delay = slot.backoff.next_delay()
                slot.restart_at = time.monotonic() + delay
                say(f"{who} exited ({_cause(status)}); restarting in {delay:.1f}s")
                continue
            slot.done = True
            if status != 0 and failed is None and not stopping:
                failed = status
                if decision is Verdict.GIVE_UP:
                    say(
                        f"{who} stopped on a configuration error (status {status}); "
                        "not restarting it: fix the setting it named and start again"
                    )
                if workers > 1:
                    say(f"{who} failed (status {status}): stopping the other workers")
                    signal_all(signal.SIGTERM)
    if failed is not None:
        return failed
    return next((slot.status for slot in slots if slot.status), 0)


def _name(slot: _Slot, workers: int) -> str:
    return "worker" if workers == 1 else f"worker {slot.number}"


def _cause(status: int) -> str:
    return f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"


def is_transient_exit(exc: BaseException) -> bool:
    """True when a worker that died of ``exc`` should be restarted (after a backoff): a
    service was unreachable or a call failed in a way that says "not now"."""
    from confluent_kafka import KafkaException

    from stockflow.mongo import is_transient

    if isinstance(exc, ServiceUnavailableError | TransientError) or is_transient(exc):
        return True
    if isinstance(exc, KafkaException) and exc.args:
        error = exc.args[0]
        return not (hasattr(error, "fatal") and error.fatal())
    return False


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, *, grace: float = GRACE_SECONDS) -> None:
    """Make this process end when ``parent_pid`` (its supervisor) is gone.

    SIGTERM to itself first (the worker stops cleanly), ``os._exit`` after ``grace`` seconds.
    """
    _set_parent_death_signal(signal.SIGTERM)

    def orphaned() -> None:
        log.warning("supervisor (pid %d) is gone: stopping this worker", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(EXIT_TEMPFAIL)

    if os.getppid() != parent_pid:  # it died before the death signal was armed
        threading.Thread(target=orphaned, name="orphaned", daemon=True).start()
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        orphaned()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
