"""Running the worker as a child process: restarts with backoff, and no orphans.

``stockflow consume`` (supervised, the default) starts ``consume --no-supervise`` as a child
and decides from its exit status what to do next (:func:`verdict`):

- 0: the worker finished (idle timeout, bounded run, SIGTERM): done;
- ``EXIT_CONFIG`` (78): its settings cannot work; restarting would fail the same way, so the
  supervisor gives up at once with one line;
- ``EXIT_TEMPFAIL`` (75: a service unreachable, a call that hung) or death by a signal (OOM
  killer, ``kill -9``): a fresh worker is started after a backoff (1 s doubling to 30 s, reset
  after a minute of good running);
- any other status (1: an error the worker already explained, such as a missing topic): passed on.

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


def supervise(
    args: Sequence[str],
    *,
    say: Callable[[str], None],
    command: Sequence[str] | None = None,
) -> int:
    """Run ``stockflow consume --no-supervise ARGS`` until it is done; returns its status."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    # Forward SIGINT/SIGTERM to the child while it runs; put back what was there on return.
    replaced = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        backoff = Backoff(base=1.0, cap=30.0)
        base = list(command or [sys.executable, "-m", "stockflow", "consume", "--no-supervise"])
        while True:
            started = time.monotonic()
            child = subprocess.Popen([*base, "--supervisor-pid", str(os.getpid()), *args])
            status = child.wait()
            decision = verdict(status, stopping=stopping)
            if decision is Verdict.DONE:
                return status
            if decision is Verdict.GIVE_UP:
                say(
                    f"worker stopped on a configuration error (status {status}); "
                    "not restarting it: fix the setting it named and start again"
                )
                return status
            if time.monotonic() - started > HEALTHY_SECONDS:
                backoff.reset()
            delay = backoff.next_delay()
            cause = f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"
            say(f"worker exited ({cause}); restarting in {delay:.1f}s")
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.1)
            if stopping:
                return status

    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


def exit_for(exc: BaseException) -> tuple[int, str] | None:
    """The exit status and one line for a worker that died of ``exc``; None when ``exc`` is
    none of the known causes (a bug, or an error stockflow explains elsewhere).

    - a service refusing stockflow's credentials or permissions (Kafka's SASL and ACL errors,
      MongoDB's AuthenticationFailed and Unauthorized): ``EXIT_CONFIG``, restarting would fail
      the same way;
    - a service unreachable, slow or failing over (a host that never resolves included: it may
      yet appear): ``EXIT_TEMPFAIL``, restarted after a backoff, the line naming what is away.
    """
    from confluent_kafka import KafkaException
    from pymongo.errors import ConnectionFailure, PyMongoError

    from stockflow import kafka_clients, mongo

    refused = kafka_clients.auth_error(exc)
    if refused is not None:
        return EXIT_CONFIG, (
            f"Kafka refused stockflow's credentials or permissions ({refused}): check "
            "KAFKA_BOOTSTRAP_SERVERS and the SASL settings, and the user's ACLs"
        )
    refused = mongo.auth_error(exc)
    if refused is not None:
        return EXIT_CONFIG, (
            f"MongoDB refused stockflow's credentials or permissions ({refused}): check the "
            "user and password in MONGODB_URI and that user's roles"
        )
    if isinstance(exc, ServiceUnavailableError | TransientError):
        return EXIT_TEMPFAIL, _one_line(str(exc))
    if isinstance(exc, ConnectionFailure):
        return EXIT_TEMPFAIL, f"MongoDB unreachable: {_one_line(str(exc))}"
    if isinstance(exc, PyMongoError) and mongo.is_transient(exc):
        return EXIT_TEMPFAIL, f"MongoDB unavailable: {_one_line(str(exc))}"
    if isinstance(exc, KafkaException) and exc.args:
        error = exc.args[0]
        if not (hasattr(error, "fatal") and error.fatal()):
            return EXIT_TEMPFAIL, f"Kafka unavailable: {_one_line(str(error))}"
    return None


def _one_line(text: str) -> str:
    """``text`` on one line, without pymongo's topology description or full error reply."""
    text = text.split(", Timeout:")[0].split(", full error:")[0]
    return " ".join(text.split())[:300]


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
