"""The supervisor's decision after its worker exited, and the worker's exit status (pure)."""

from __future__ import annotations

import signal
import sys

import pytest
from confluent_kafka import KafkaError, KafkaException
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from stockflow.errors import EXIT_CONFIG, EXIT_TEMPFAIL, ServiceUnavailableError, TransientError
from stockflow.supervisor import Verdict, exit_for, supervise, verdict
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


# --- what a worker that died of an exception exits with ---
def _kafka(code: int, text: str = "kafka error", *, fatal: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, text, fatal=fatal))


RESTART_CAUSES: dict[str, BaseException] = {
    "Kafka away": _kafka(KafkaError._TRANSPORT, "Connection refused"),
    "Kafka timed out": _kafka(KafkaError._TIMED_OUT),
    "a service away": ServiceUnavailableError("cannot reach Kafka at 127.0.0.1:9"),
    "a transient error": TransientError("MongoDB unavailable"),
    "MongoDB host that never resolves": ServerSelectionTimeoutError(
        "nosuchhost.invalid:27017: [Errno -2] Name or service not known (configured timeouts: "
        "socketTimeoutMS: 30000.0ms, connectTimeoutMS: 5000.0ms), Timeout: 5.0s, Topology "
        "Description: <TopologyDescription id: 1, topology_type: Unknown, servers: [...]>"
    ),
}

CONFIG_CAUSES: dict[str, BaseException] = {
    "Kafka SASL": _kafka(KafkaError.SASL_AUTHENTICATION_FAILED, "Authentication failed"),
    "Kafka authentication": _kafka(KafkaError._AUTHENTICATION, "SASL authentication error"),
    "Kafka topic ACL": _kafka(KafkaError.TOPIC_AUTHORIZATION_FAILED),
    "Kafka group ACL": _kafka(KafkaError.GROUP_AUTHORIZATION_FAILED),
    "Kafka transactional id ACL": _kafka(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
    "MongoDB AuthenticationFailed": OperationFailure("Authentication failed.", 18, {"code": 18}),
    "MongoDB Unauthorized": OperationFailure("not authorized", 13, {"code": 13}),
}


@pytest.mark.parametrize("exc", RESTART_CAUSES.values(), ids=RESTART_CAUSES.keys())
def test_a_worker_that_died_of_an_outage_exits_75_with_one_line(exc: BaseException) -> None:
    found = exit_for(exc)
    assert found is not None and found[0] == EXIT_TEMPFAIL
    assert "\n" not in found[1] and "Topology Description" not in found[1], found[1]


@pytest.mark.parametrize("exc", CONFIG_CAUSES.values(), ids=CONFIG_CAUSES.keys())
def test_a_worker_refused_by_a_service_exits_78(exc: BaseException) -> None:
    found = exit_for(exc)
    assert found is not None and found[0] == EXIT_CONFIG, found
    assert "credentials or permissions" in found[1] and "\n" not in found[1]


def test_a_host_that_never_resolves_is_named_in_the_line() -> None:
    found = exit_for(RESTART_CAUSES["MongoDB host that never resolves"])
    assert found is not None and "nosuchhost.invalid:27017" in found[1]
    assert found[1].startswith("MongoDB unreachable")


def test_a_bug_is_not_a_restart() -> None:
    assert exit_for(ValueError("a bug")) is None
    assert exit_for(_kafka(KafkaError._FATAL, "fenced", fatal=True)) is None


def test_supervise_restores_the_signal_handlers_it_replaced() -> None:
    """supervise() forwards SIGINT/SIGTERM to its child while it runs, and puts back what was
    there before when it returns (before: its handlers stayed in the calling process)."""

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        supervise([], say=lambda _: None, command=[sys.executable, "-c", "pass"])
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
