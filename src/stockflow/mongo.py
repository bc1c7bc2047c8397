"""The MongoDB client and what its errors mean.

Every MongoDB call stockflow makes has a deadline (:func:`mongo_client`), and every error a
call raises is classified here, in one place, by what it says about the world. The default is
to wait: an error is dead-lettered only when it is on a short list of errors about the request
itself, because dead-lettering a valid order because the database was away, full, read-only or
refusing a rotated password is the failure this module exists to prevent.

- *about the request* (:func:`request_error`, the codes of :data:`REQUEST_CODES`): the server
  refuses this document or this update (a value it cannot store, a document too large or
  failing validation, a duplicate key). Retried a few times, then dead-lettered.
- *configuration* (:func:`auth_error`, :data:`AUTH_CODES`): the server refuses stockflow's
  credentials or permissions. No message is at fault and waiting will not fix it: the worker
  stops with ``EXIT_CONFIG`` and one line that says which setting to look at.
- *everything else* (:func:`classify` names why): unreachable, slow, failing over, shutting
  down, overloaded, out of disk or quota, a storage error of FerretDB's backend, a code nobody
  listed. The loop keeps the circuit open and retries, however long it lasts.

Only codes, exception types and error labels decide, never the text of a message: a server's
message can quote the document (``Document failed validation: {...}``), and data must not
choose between a dead letter and a wait. FerretDB reports its own failures (its PostgreSQL
away, a statement timeout, a read-only standby, a pool error) as ``InternalError`` (code 1)
whose message is the driver's; code 1 is not on the request list, so all of them wait.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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

REQUEST_CODES: Mapping[int, str] = {
    2: "BadValue",
    9: "FailedToParse",
    14: "TypeMismatch",
    22: "InvalidBSON",
    52: "DollarPrefixedFieldName",
    55: "InvalidDBRef",
    56: "EmptyFieldName",
    57: "DottedFieldName",
    66: "ImmutableField",
    121: "DocumentValidationFailure",
    10334: "BSONObjectTooLarge",
    11000: "DuplicateKey",
    17280: "KeyTooLong",
}
"""Server error codes that say "not this request": the document or update is refused as it
is, and sending it again will be refused again. The only codes that lead to a dead letter."""

AUTH_CODES: Mapping[int, str] = {
    11: "UserNotFound",
    13: "Unauthorized",
    18: "AuthenticationFailed",
}
"""Server error codes that say stockflow's credentials or permissions are refused."""

TRANSIENT_CODES: Mapping[int, str] = {
    1: "InternalError",
    6: "HostUnreachable",
    7: "HostNotFound",
    24: "LockTimeout",
    46: "LockBusy",
    50: "MaxTimeMSExpired",
    64: "WriteConcernFailed",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    112: "WriteConflict",
    189: "PrimarySteppedDown",
    262: "ExceededTimeLimit",
    365: "TemporarilyUnavailable",
    8000: "AtlasError",
    10107: "NotWritablePrimary",
    11600: "InterruptedAtShutdown",
    11601: "Interrupted",
    11602: "InterruptedDueToReplStateChange",
    13388: "StaleConfig",
    13435: "NotPrimaryNoSecondaryOk",
    14031: "OutOfDiskSpace",
    16500: "RequestRateTooLarge",
}
"""Names of some codes that wait, for log lines only: every code not in :data:`REQUEST_CODES`
or :data:`AUTH_CODES` waits, listed here or not."""

TRANSIENT_LABELS = ("RetryableWriteError", "TransientTransactionError", "SystemOverloadedError")
"""Error labels servers attach to errors that are safe and useful to retry (they win over a
request code: the server itself says to try again)."""


def _code(code: object) -> int | None:
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _codes(exc: PyMongoError) -> list[int | None]:
    """The server's error codes in ``exc``: its own, or each write error's of a bulk write."""
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        return [
            _code(e.get("code")) if isinstance(e, Mapping) else None
            for e in details.get("writeErrors") or []
        ]
    if isinstance(exc, OperationFailure):
        return [_code(exc.code)]
    return []


def _write_error_labelled(exc: PyMongoError) -> bool:
    if isinstance(exc, BulkWriteError):
        errors = (exc.details or {}).get("writeErrors") or []
        return any(
            label in TRANSIENT_LABELS
            for e in errors
            if isinstance(e, Mapping)
            for label in e.get("errorLabels") or ()
        )
    return False


BACKEND_AUTH = re.compile(r"\(SQLSTATE (28000|28P01)\)")
"""FerretDB's answer when its PostgreSQL refuses the client's user (FerretDB v1 logs in to
PostgreSQL as the client's user): ``InternalError`` whose message ends ``FATAL: role "x" does
not exist (SQLSTATE 28000)`` or ``password authentication failed ... (SQLSTATE 28P01)``."""


def auth_error(exc: BaseException, *, data_free: bool = False) -> str | None:
    """The name of the refusal when ``exc`` says stockflow's credentials or permissions are
    refused (a configuration error: stop, do not wait, do not dead-letter); else None.

    ``data_free``: ``exc`` answers a command that carries no document data (a ``ping``), so
    FerretDB's message may be read for its backend's refusal (:data:`BACKEND_AUTH`).
    """
    if not isinstance(exc, PyMongoError):
        return None
    for code in _codes(exc):
        if code is not None and code in AUTH_CODES:
            return AUTH_CODES[code]
    if data_free and isinstance(exc, OperationFailure) and exc.code == 1:
        found = BACKEND_AUTH.search(str((exc.details or {}).get("errmsg", "")))
        if found is not None:
            return f"SQLSTATE {found.group(1)} behind FerretDB"
    return None


def request_error(exc: BaseException) -> str | None:
    """The name of the refusal when ``exc`` is about the request itself (dead-letter it after
    a few attempts); None when it is not (wait, or stop on :func:`auth_error`).

    An exception that is not pymongo's (a bug, a value stockflow cannot encode) is about the
    request. A pymongo error is only when each of its codes is in :data:`REQUEST_CODES`, no
    retry label is attached and no write concern failed beside it.
    """
    if not isinstance(exc, PyMongoError):
        return type(exc).__name__
    if isinstance(exc, ConnectionFailure | CursorNotFound | WriteConcernError) or exc.timeout:
        return None
    if any(exc.has_error_label(label) for label in TRANSIENT_LABELS):
        return None
    if _write_error_labelled(exc):
        return None
    details = exc.details if isinstance(exc, BulkWriteError | OperationFailure) else None
    if isinstance(details, Mapping) and (
        details.get("writeConcernErrors") or details.get("writeConcernError")
    ):
        return None
    codes = _codes(exc)
    if not codes or any(code not in REQUEST_CODES for code in codes):
        return None
    return REQUEST_CODES[codes[0]] if codes[0] is not None else None


def classify(exc: BaseException) -> str | None:
    """Why ``exc`` is waited out (a short name), or None when it is about the request or is a
    refusal of the credentials (:func:`auth_error`)."""
    if not isinstance(exc, PyMongoError):
        return None
    if request_error(exc) is not None or auth_error(exc) is not None:
        return None
    if isinstance(exc, ConnectionFailure):  # unreachable, timed out, no server, pool closed
        return type(exc).__name__
    if exc.timeout:  # client-side operation timeout (CSOT) or maxTimeMS on the server
        return "timeout"
    if isinstance(exc, WriteConcernError):
        return "write concern"
    codes = [code for code in _codes(exc) if code not in REQUEST_CODES]
    if codes:
        code = codes[0]
        return TRANSIENT_CODES.get(code, f"code {code}") if code is not None else "write"
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is a MongoDB error to wait out (see the module's docstring)."""
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
