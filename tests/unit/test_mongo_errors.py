"""What MongoDB errors mean: only an error about the request is dead-lettered; every other
one is waited out, and a refusal of stockflow's credentials stops the worker (exit 78).

Constructed pymongo exceptions, shaped as MongoDB and FerretDB send them, raised from the
applier's first MongoDB call: the applier must turn every error that is not on the short list
of errors about the request into a TransientError (the loop then pauses and waits, however
long), let only the listed ones through to the retry-then-dead-letter path, and turn
authentication and authorization failures into a configuration error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest
from confluent_kafka import Message
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    CursorNotFound,
    DocumentTooLarge,
    DuplicateKeyError,
    ExecutionTimeout,
    InvalidOperation,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
    WriteConcernError,
    WTimeoutError,
)

from stockflow.applier import Applier
from stockflow.config import Settings
from stockflow.errors import ConfigError, TransientError
from stockflow.ledger import insert_all
from stockflow.mongo import auth_error, classify, client_options, is_transient
from stockflow.orders import Order
from stockflow.planner import Entry

# FerretDB v1.24.2 (postgresql handler) with its PostgreSQL stopped, as pymongo raised it.
FERRET_PG_DOWN = (
    "[msg_insert.go:168 handler.(*Handler).MsgInsert] failed to connect to `user=postgres "
    "database=ferretdb`:\n\t127.0.0.1:45532 (127.0.0.1): dial error: dial tcp "
    "127.0.0.1:45532: connect: connection refused"
)


def failure(code: int, errmsg: str = "error", **extra: Any) -> OperationFailure:
    return OperationFailure(errmsg, code, {"ok": 0.0, "errmsg": errmsg, "code": code, **extra})


def bulk(write_errors: list[dict[str, Any]], wc_errors: list[dict[str, Any]] | None = None) -> Any:
    return BulkWriteError(
        {
            "writeErrors": write_errors,
            "writeConcernErrors": wc_errors or [],
            "nInserted": 0,
            "nUpserted": 0,
            "nMatched": 0,
            "nModified": 0,
            "nRemoved": 0,
            "upserted": [],
        }
    )


TRANSIENT: dict[str, PyMongoError] = {
    "connection failure": ConnectionFailure("connection closed"),
    "auto reconnect": AutoReconnect("127.0.0.1:27017: connection reset"),
    "network timeout": NetworkTimeout("127.0.0.1:27017: timed out"),
    "server selection": ServerSelectionTimeoutError("No servers found yet"),
    "pool wait queue": WaitQueueTimeoutError("timed out waiting for a connection"),
    "not primary": NotPrimaryError("not primary", {"code": 10107, "errmsg": "not primary"}),
    "NotWritablePrimary code": failure(10107, "not primary"),
    "PrimarySteppedDown": failure(189, "stepped down"),
    "ShutdownInProgress": failure(91, "shutting down"),
    "InterruptedAtShutdown": failure(11600, "interrupted at shutdown"),
    "max time expired": ExecutionTimeout("operation exceeded time limit", 50, {"code": 50}),
    "ExceededTimeLimit": failure(262, "exceeded time limit"),
    "WriteConflict": failure(112, "write conflict"),
    "write concern error": WriteConcernError("waiting for replication", 64, {"code": 64}),
    "wtimeout": WTimeoutError("timed out", 64, {"code": 64, "errInfo": {"wtimeout": True}}),
    "retryable label": failure(2, "weird", errorLabels=["RetryableWriteError"]),
    "transaction label": failure(251, "no such txn", errorLabels=["TransientTransactionError"]),
    "cursor lost": CursorNotFound("cursor id 1 not found", 43, {"code": 43}),
    "bulk: NotWritablePrimary inside": bulk(
        [{"index": 0, "code": 10107, "errmsg": "not primary", "op": {}}]
    ),
    "bulk: duplicates and one stepped down": bulk(
        [
            {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key", "op": {}},
            {"index": 1, "code": 189, "errmsg": "stepped down", "op": {}},
        ]
    ),
    "bulk: write concern errors only": bulk(
        [], [{"code": 64, "errmsg": "waiting for replication timed out"}]
    ),
    "bulk: wtimeout": bulk([], [{"code": 100, "errInfo": {"wtimeout": True}, "errmsg": "x"}]),
    "FerretDB: PostgreSQL refused": failure(1, FERRET_PG_DOWN),
    "FerretDB: pooled connection lost": failure(1, "[msg_update.go:117] unexpected EOF"),
    "FerretDB: PostgreSQL shutting down": failure(
        1,
        "FATAL: terminating connection due to administrator command (SQLSTATE 57P01)",
    ),
    "FerretDB: PostgreSQL starting": failure(
        1, "FATAL: the database system is starting up (SQLSTATE 57P03)"
    ),
    "FerretDB: too many connections": failure(
        1, "FATAL: sorry, too many clients already (SQLSTATE 53300)"
    ),
    "FerretDB: SQLite busy": failure(1, "database is locked (5) (SQLITE_BUSY)"),
    # Not about the order either: a full disk, a quota, a shard moving, an interrupted
    # command, FerretDB's PostgreSQL timing a statement out or read-only, a closed pool.
    "OutOfDiskSpace": failure(14031, "Cannot write: disk full"),
    "quota (Atlas)": failure(8000, "you are over your space quota"),
    "TemporarilyUnavailable": failure(365, "temporarily unavailable"),
    "StaleConfig": failure(13388, "stale config"),
    "Interrupted": failure(11601, "operation was interrupted"),
    "an error code nobody listed": failure(424242, "something new"),
    "FerretDB: statement timeout": failure(
        1, "ERROR: canceling statement due to statement timeout (SQLSTATE 57014)"
    ),
    "FerretDB: read-only": failure(
        1, "ERROR: cannot execute UPDATE in a read-only transaction (SQLSTATE 25006)"
    ),
    "FerretDB: any internal error": failure(1, "[msg_update.go:117] unsupported operator $foo"),
    "closed pool": InvalidOperation("Cannot use MongoClient after close"),
    "bulk: an unlisted code beside a refused document": bulk(
        [
            {"index": 0, "code": 2, "errmsg": "cannot store", "op": {}},
            {"index": 1, "code": 14031, "errmsg": "disk full", "op": {}},
        ]
    ),
}

ABOUT_THE_REQUEST: dict[str, BaseException] = {
    "duplicate key": DuplicateKeyError("E11000", 11000, {"code": 11000}),
    "bad value": failure(2, "BadValue: $set of a non-number"),
    "type mismatch": failure(14, "TypeMismatch"),
    "document too large": DocumentTooLarge("BSON document too large"),
    "bulk: a document the server refuses": bulk(
        [{"index": 0, "code": 2, "errmsg": "cannot store", "op": {}}]
    ),
    "failed to parse": failure(9, "FailedToParse"),
    "too large on the server": failure(10334, "BSONObjectTooLarge"),
    # The server's message may quote the document: its text never decides.
    "validation failure quoting an outage": failure(
        121, "Document failed validation: {note: 'connection refused'}"
    ),
    "not a MongoDB error": ValueError("stock is not a number"),
}


AUTH: dict[str, PyMongoError] = {
    "AuthenticationFailed": failure(18, "Authentication failed."),
    "Unauthorized": failure(13, "not authorized on ecommerce to execute command { update }"),
    "bulk: Unauthorized inside": bulk(
        [{"index": 0, "code": 13, "errmsg": "not authorized", "op": {}}]
    ),
}


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_availability_errors_are_transient(exc: PyMongoError) -> None:
    assert is_transient(exc), classify(exc)


@pytest.mark.parametrize("exc", ABOUT_THE_REQUEST.values(), ids=ABOUT_THE_REQUEST.keys())
def test_errors_about_the_request_are_not(exc: BaseException) -> None:
    assert not is_transient(exc), classify(exc)


class _FailingLedger:
    """A ledger whose first call fails as MongoDB did."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def claim(self, entries: Sequence[Entry]) -> None:
        raise self.exc


def _applier(exc: BaseException) -> Applier:
    settings = Settings(topic="t")
    return Applier(settings, cast(Any, None), cast(Any, _FailingLedger(exc)), cast(Any, None))


def _command() -> list[Message]:
    order = Order(order_id=1, product_id=101, quantity=1)
    return [Message(topic="t.by-product", partition=0, offset=0, value=order.encode())]


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_the_applier_waits_out_every_availability_error(exc: PyMongoError) -> None:
    with pytest.raises(TransientError) as caught:
        _applier(exc).handle(_command())
    assert caught.value.__cause__ is exc


@pytest.mark.parametrize("exc", ABOUT_THE_REQUEST.values(), ids=ABOUT_THE_REQUEST.keys())
def test_the_applier_lets_request_errors_through_to_the_dead_letter_path(
    exc: BaseException,
) -> None:
    with pytest.raises(type(exc)):
        _applier(exc).handle(_command())


@pytest.mark.parametrize("exc", AUTH.values(), ids=AUTH.keys())
def test_a_refusal_of_the_credentials_is_a_configuration_error(exc: PyMongoError) -> None:
    assert auth_error(exc) is not None
    with pytest.raises(ConfigError) as caught:
        _applier(exc).handle(_command())
    line = str(caught.value)
    assert "\n" not in line and "MONGODB_URI" in line, line


@pytest.mark.parametrize("exc", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_errors_that_wait_are_not_configuration_errors(exc: PyMongoError) -> None:
    assert auth_error(exc) is None


class _Collection:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def insert_many(self, docs: Sequence[dict[str, Any]], ordered: bool) -> None:
        raise self.exc


def test_insert_all_takes_duplicates_as_already_there() -> None:
    exc = bulk([{"index": 1, "code": 11000, "errmsg": "E11000 duplicate key", "op": {}}])
    docs = [{"_id": "a"}, {"_id": "b"}]
    assert insert_all(cast(Any, _Collection(exc)), docs) == {"b"}


def test_insert_all_does_not_take_a_write_concern_error_as_success() -> None:
    """The inserts were not confirmed durable: that must not count as done."""
    exc = bulk(
        [{"index": 1, "code": 11000, "errmsg": "E11000 duplicate key", "op": {}}],
        [{"code": 64, "errmsg": "waiting for replication timed out"}],
    )
    with pytest.raises(BulkWriteError) as caught:
        insert_all(cast(Any, _Collection(exc)), [{"_id": "a"}, {"_id": "b"}])
    assert is_transient(caught.value)


def test_every_call_has_a_deadline_and_the_uri_can_override_it() -> None:
    options = client_options(Settings(mongodb_uri=None))
    assert options["timeoutMS"] is None and options["socketTimeoutMS"] == 30_000
    assert options["connectTimeoutMS"] == 5000 and options["serverSelectionTimeoutMS"] == 5000
    mine = Settings(mongodb_uri="mongodb+srv://u:p@cluster.example/?timeoutMS=900&appName=x")
    assert "timeoutMS" not in client_options(mine)  # the URI's own 900 ms stands
    assert "appname" not in client_options(mine)
    assert client_options(Settings(mongodb_operation_timeout_ms=900))["timeoutMS"] == 900
