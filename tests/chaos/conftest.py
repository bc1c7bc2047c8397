"""A chaos run that proved nothing fails: when every selected chaos scenario was skipped, the
session exits non-zero and says why, instead of reporting success with "N skipped"."""

from __future__ import annotations

import pytest

from stockflow.config import Settings
from tests.chaos.harness import local_stack

_ran: list[str] = []
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "chaos" not in report.keywords:
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")
    elif report.when == "call" or report.failed:
        _ran.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and not _ran and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped and not _ran:
        terminalreporter.section("chaos: nothing was proved", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"all {len(_skipped)} chaos scenarios were skipped, so this run fails:", red=True
        )
        for line in sorted(set(s.split(": ", 1)[1] for s in _skipped)):
            terminalreporter.line(f"  {line}")


@pytest.fixture(scope="module")
def base() -> Settings:
    """The local stack, started if needed, for scenarios that break nothing of it (a module
    may define its own, as test_chaos.py does)."""
    return local_stack(breaks=False)
