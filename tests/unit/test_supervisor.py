"""The supervisor's decision after its worker exited (pure)."""

from __future__ import annotations

import signal

import pytest

from stockflow.errors import EXIT_CONFIG, EXIT_TEMPFAIL
from stockflow.supervisor import Verdict, verdict
from stockflow.watchdog import EXIT_STUCK


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0, Verdict.DONE),
        (1, Verdict.DONE),  # an error the worker explained itself (a missing topic)
        (EXIT_TEMPFAIL, Verdict.RESTART),
        (-signal.SIGKILL, Verdict.RESTART),  # OOM killer, kill -9
        (-signal.SIGSEGV, Verdict.RESTART),
        (EXIT_CONFIG, Verdict.GIVE_UP),
    ],
)
def test_verdict(status: int, expected: Verdict) -> None:
    assert verdict(status, stopping=False) is expected


def test_a_supervisor_asked_to_stop_restarts_nothing() -> None:
    assert verdict(EXIT_TEMPFAIL, stopping=True) is Verdict.DONE


def test_the_watchdog_exit_is_a_restart() -> None:
    assert verdict(EXIT_STUCK, stopping=False) is Verdict.RESTART
