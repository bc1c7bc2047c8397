"""The MongoDB client and what its errors mean.

Every MongoDB call stockflow makes has a deadline (:func:`mongo_client`), and every error a
call raises is classified here, in one place, by what it says about the world:

- *transient* (:func:`is_transient`): the server, or the storage behind it, is unreachable,
  slow, failing over, shutting down or overloaded. Nothing is wrong with the data: the loop
  keeps the circuit open and retries, however long the outage lasts. Dead-lettering a valid
  order because the database was away is the failure this module exists to prevent.
- anything else is about the request itself (a document the server refuses, a value it cannot
  store): it is retried a few times and then dead-lettered with the reason.

MongoDB says which errors are which by exception type, error code and error label; FerretDB
reports its storage going away as an ``InternalError`` (code 1) whose message is the
PostgreSQL driver's, so for that code the message is read too (see ``BACKEND_DOWN``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from pymongo import MongoClient
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    CursorNotFound,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)

from stockflow.config import Settings

Doc = dict[str, Any]

TRANSIENT_CODES: Mapping[int, str] = {
    6: "HostUnreachable",
    7: "HostNotFound",
    24: "LockTimeout",
    46: "LockBusy",
    50: "MaxTimeMSExpired",
    64: "WriteConcernFailed",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    112: "WriteConflict",
    117: "ConflictingOperationInProgress",
    133: "FailedToSatisfyReadPreference",
    134: "ReadConcernMajorityNotAvailableYet",
    189: "PrimarySteppedDown",
    202: "NetworkInterfaceExceededTimeLimit",
    262: "ExceededTimeLimit",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    16500: "RequestRateTooLarge",  # Azure Cosmos DB's MongoDB API: throttled, retry later
}
"""Server error codes that mean "not now" rather than "not this": the server is starting,
stepping down, shutting down, timed out, throttling or lost a write race."""

TRANSIENT_LABELS = frozenset(
    {
        "RetryableWriteError",
        "TransientTransactionError",
        "SystemOverloadedError",
    }
)
"""Error labels servers attach to errors that are safe and useful to retry."""

INTERNAL_ERROR = 1

BACKEND_DOWN = re.compile(
    "|".join(
        [
            # Recorded from FerretDB v1.24.2 (postgresql handler) with its PostgreSQL stopped:
            #   OperationFailure code 1, errmsg "[msg_insert.go:168 handler.(*Handler).MsgInsert]
            #   failed to connect to `user=postgres database=ferretdb`: 127.0.0.1:5432
            #   (127.0.0.1): dial error: dial tcp 127.0.0.1:5432: connect: connection refused"
            # (the same for ping, find and update, only the Go call sites differ). With its
            # PostgreSQL hung (SIGSTOP) FerretDB answers nothing at all: the client's own
            # deadline ends the call with NetworkTimeout ("timed out (configured timeouts:
            # timeoutMS: ...)").
            r"failed to connect to",
            r"dial error",
            r"connection refused",
            # The PostgreSQL driver (pgx) losing a pooled connection mid-command.
            r"conn closed",
            r"conn busy",
            r"unexpected EOF",
            r"broken pipe",
            r"connection reset by peer",
            r"i/o timeout",
            r"context deadline exceeded",
            r"context canceled",
            r"timeout: context",
            # PostgreSQL's own: 57P01-57P03 admin/crash shutdown, cannot connect now ("the
            # database system is starting up"), class 08 connection exceptions, class 53
            # insufficient resources (too many connections), 40001/40P01 serialisation
            # failure and deadlock (retry the transaction).
            r"SQLSTATE 57P0[1-3]",
            r"SQLSTATE 08\w{3}",
            r"SQLSTATE 53\w{3}",
            r"SQLSTATE 40(?:001|P01)",
            r"the database system is (?:starting up|shutting down|in recovery mode)",
            # The SQLite handler's "busy" (another connection holds the write lock).
            r"database is locked",
            r"SQLITE_BUSY",
        ]
    ),
    re.IGNORECASE,
)
"""Messages of FerretDB's ``InternalError`` that mean its storage is away or overloaded."""


def _code_transient(code: object, message: str = "") -> bool:
    if not isinstance(code, int):
        return False
    if code in TRANSIENT_CODES:
        return True
    return code == INTERNAL_ERROR and BACKEND_DOWN.search(message) is not None


def _labels_transient(labels: Iterable[str]) -> bool:
    return any(label in TRANSIENT_LABELS for label in labels)


def _write_error_transient(error: Mapping[str, Any]) -> bool:
    info = error.get("errInfo")
    labels = error.get("errorLabels") or ()
    return (
        _code_transient(error.get("code"), str(error.get("errmsg", "")))
        or _labels_transient(labels)
        or (isinstance(info, Mapping) and bool(info.get("wtimeout")))
    )


def classify(exc: BaseException) -> str | None:
    """Why ``exc`` is transient (a short name), or None when it is about the request."""
    if not isinstance(exc, PyMongoError):
        return None
    # Connection-level: unreachable, timed out, not primary, pool exhausted, no server.
    if isinstance(exc, ConnectionFailure):
        return type(exc).__name__
    if exc.timeout:  # client-side operation timeout (CSOT) or maxTimeMS on the server
        return "timeout"
    labels = [label for label in TRANSIENT_LABELS if exc.has_error_label(label)]
    if labels:
        return labels[0]
    if isinstance(exc, WriteConcernError):  # includes WTimeoutError
        return "write concern"
    if isinstance(exc, CursorNotFound):  # the server lost the cursor (restart, failover)
        return "cursor lost"
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        if details.get("writeConcernErrors"):
            return "write concern"
        errors = details.get("writeErrors") or []
        transient = [e for e in errors if isinstance(e, Mapping) and _write_error_transient(e)]
        if transient:
            code = transient[0].get("code")
            return TRANSIENT_CODES.get(code, f"code {code}") if isinstance(code, int) else "write"
        return None
    if isinstance(exc, OperationFailure):
        reply = exc.details or {}
        if _code_transient(exc.code, str(reply.get("errmsg", exc))):
            return TRANSIENT_CODES.get(exc.code or 0, "backend unavailable")
        # A write concern error reported beside a successful command (no exception type).
        if reply.get("writeConcernError"):
            return "write concern"
    return None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the database is away, slow or failing over (retry, wait)."""
    return classify(exc) is not None


def client_options(settings: Settings) -> dict[str, Any]:
    """The client's deadlines and identity, except those the connection string sets itself."""
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": settings.mongodb_timeout_ms,
        "connectTimeoutMS": settings.mongodb_connect_timeout_ms,
        "socketTimeoutMS": settings.mongodb_socket_timeout_ms,
        "timeoutMS": settings.mongodb_operation_timeout_ms or None,
        "appname": "stockflow",
    }
    # Read the query by hand: pymongo's parser resolves mongodb+srv names (DNS) on the way.
    _, _, query = settings.mongodb_url.partition("?")
    given = {key.lower() for key, _ in parse_qsl(query, keep_blank_values=True)}
    return {key: value for key, value in options.items() if key.lower() not in given}


def mongo_client(settings: Settings) -> MongoClient[Doc]:
    """A client for the configured server (a real MongoDB or the local FerretDB).

    Every call is bounded: ``socketTimeoutMS`` ends the wait for any reply (a half-open
    connection, a FerretDB whose PostgreSQL hangs or whose pool deadlocked: FerretDB then
    accepts the command and never answers) with ``NetworkTimeout``, which is transient; server
    selection and connecting have their own. ``timeoutMS`` (client-side operation timeout,
    sent as ``maxTimeMS``, which FerretDB v1.24 accepts) is off unless configured: pymongo
    then waits that long for an absent server instead of the server selection timeout.
    """
    return MongoClient(settings.mongodb_url, tz_aware=True, **client_options(settings))
