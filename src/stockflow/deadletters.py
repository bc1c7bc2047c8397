"""Dead letters: the record of a message that cannot be handled, made to fit the producer's limit.

A dead letter on ``<topic>.dlq`` carries, as headers, the reason, the source position on the
input topic, the time, the number of attempts, and the original message's size and SHA-256;
then the original headers and bytes, as much of them as fits under the producer's
``message.max.bytes``. The broker accepts messages a little over 1 MB, the producer refuses
anything over 1,000,000 bytes with its headers: a dead letter that carried the whole of a
large message could never be produced, its transaction was retried forever and its partition
stopped. When something had to be cut, ``stockflow.dlq.truncated`` names what (``value``,
``headers``, ``key``).

The full original is kept in MongoDB (:class:`DeadLetterStore`, collection ``dead_letters``,
keyed by the source position), written before the transaction that produces the dead letter
commits, so ``stockflow dlq show`` and ``dlq replay`` always have the original bytes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from stockflow.config import Settings
from stockflow.errors import TransientError
from stockflow.ledger import insert_all
from stockflow.outcomes import Headers, Source

H_REASON = "stockflow.dlq.reason"
H_SOURCE_TOPIC = "stockflow.dlq.source.topic"
H_SOURCE_PARTITION = "stockflow.dlq.source.partition"
H_SOURCE_OFFSET = "stockflow.dlq.source.offset"
H_TIME = "stockflow.dlq.time"
H_ATTEMPTS = "stockflow.dlq.attempts"
H_STAGE = "stockflow.dlq.stage"
H_SIZE = "stockflow.dlq.original.size"
H_SHA256 = "stockflow.dlq.original.sha256"
H_TRUNCATED = "stockflow.dlq.truncated"
H_ORIGINAL_TOPIC = "stockflow.dlq.original.topic"
H_SOURCE_ID = "stockflow.dlq.source.id"
"""Kafka's id of the input topic the source position belongs to (absent when not known)."""
"""On the loop's own dead letter of an output it could not produce: the output's topic."""

PRODUCER_MAX_BYTES = 1_000_000
"""librdkafka's default ``message.max.bytes``: the largest record (key, value, headers and
framing) a producer accepts."""
MARGIN = 1024
"""Bytes kept free under the limit for the record's framing (librdkafka counts about 40 bytes
per record and 10 per header; the rest is slack)."""
MAX_REASON = 1000
"""Characters of a reason kept in the header (reasons are one line; exceptions can be long)."""
COLLECTION = "dead_letters"

Doc = dict[str, Any]


def size_limit(settings: Settings) -> int:
    """The largest record the producers stockflow builds from ``settings`` will accept."""
    configured = settings.kafka_config().get("message.max.bytes", PRODUCER_MAX_BYTES)
    return int(configured)


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")


def dead_letter_headers(
    reason: str,
    source: Source,
    *,
    attempts: int = 1,
    original: Any = None,
) -> Headers:
    """The original message's headers, then the reason, source and time of dead-lettering
    (the plain form, for dead letters that carry no payload; :func:`build` adds the rest)."""
    headers: Headers = list(_header_items(original))
    headers += [
        (H_REASON, reason.encode()),
        (H_SOURCE_TOPIC, source.topic.encode()),
        (H_SOURCE_PARTITION, str(source.partition).encode()),
        (H_SOURCE_OFFSET, str(source.offset).encode()),
        (H_TIME, f"{time.time():.3f}".encode()),
        (H_ATTEMPTS, str(attempts).encode()),
    ]
    return headers


def _header_items(original: Any) -> list[tuple[str, bytes]]:
    items = original.items() if isinstance(original, Mapping) else (original or [])
    return [(str(k), _bytes(v)) for k, v in items if not str(k).startswith("stockflow.dlq.")]


def _size(headers: Sequence[tuple[str, bytes]]) -> int:
    return sum(len(k.encode()) + len(v) + 10 for k, v in headers)


@dataclass(frozen=True, slots=True)
class FittedLetter:
    """A dead letter as produced (fitting the limit) and the document keeping its original."""

    source: Source
    """Where the message was on the input topic."""
    value: bytes | None
    key: bytes | None
    headers: Headers
    truncated: tuple[str, ...]
    """What had to be cut: ``value``, ``headers``, ``key`` (empty: the original is whole)."""
    doc: Doc
    """The record kept in MongoDB, with the whole original."""


def build(
    *,
    value: bytes | None,
    key: bytes | None,
    original_headers: Any,
    reason: str,
    source: Source,
    attempts: int,
    stage: str,
    limit: int,
    details: Mapping[str, Any] | None = None,
    source_id: str | None = None,
) -> FittedLetter:
    """The dead letter of a message: reason and source headers, then as much of the message
    as fits in ``limit`` bytes; ``details`` are extra fields for the kept document."""
    payload = value or b""
    digest = hashlib.sha256(payload).hexdigest()
    at = time.time()
    reason = reason if len(reason) <= MAX_REASON else f"{reason[: MAX_REASON - 3]}..."
    ours: list[tuple[str, bytes]] = [
        (H_REASON, reason.encode()),
        (H_SOURCE_TOPIC, source.topic.encode()),
        (H_SOURCE_PARTITION, str(source.partition).encode()),
        (H_SOURCE_OFFSET, str(source.offset).encode()),
        (H_TIME, f"{at:.3f}".encode()),
        (H_ATTEMPTS, str(attempts).encode()),
        (H_STAGE, stage.encode()),
        (H_SIZE, str(len(payload)).encode()),
        (H_SHA256, digest.encode()),
        *([(H_SOURCE_ID, source_id.encode())] if source_id else []),
    ]
    theirs = _header_items(original_headers)
    room = limit - MARGIN - _size(ours) - _size([(H_TRUNCATED, b"value,headers,key")])
    truncated: list[str] = []
    kept_key = key
    if key is not None and len(key) > room // 4:
        kept_key, truncated = None, ["key"]
    room -= len(kept_key or b"")
    if _size(theirs) > room // 2:
        # Headers go whole or not at all (a cut header would mislead whoever reads it).
        theirs, truncated = [], [*truncated, "headers"]
    room -= _size(theirs)
    kept_value = value
    if len(payload) > room:
        kept_value, truncated = payload[: max(0, room)], ["value", *truncated]
    if truncated:
        ours.append((H_TRUNCATED, ",".join(truncated).encode()))
    headers: Headers = [*theirs, *ours]
    doc: Doc = {
        "_id": str(source),
        "stage": stage,
        "reason": reason,
        "attempts": attempts,
        "at": at,
        "size": len(payload),
        "sha256": digest,
        "value": payload,
        "key": key,
        # Documents, not pairs: FerretDB v1 stores no arrays inside arrays.
        "headers": [{"name": k, "value": v} for k, v in _header_items(original_headers)],
        "truncated": truncated,
        **(details or {}),
    }
    return FittedLetter(source, kept_value, kept_key, headers, tuple(truncated), doc)


class DeadLetterStore:
    """The ``dead_letters`` collection: every dead letter's whole original, by source position.

    Inserts are idempotent (the source position is the ``_id``): a batch redone after a crash
    keeps the first attempt's document.
    """

    def __init__(self, database: Database[Doc]) -> None:
        self.collection: Collection[Doc] = database[COLLECTION]

    def keep(self, letters: Sequence[FittedLetter]) -> None:
        """Store these dead letters' originals; TransientError if MongoDB does not take them
        (the batch is then retried: its dead letters are not produced without their originals).
        """
        if not letters:
            return
        try:
            insert_all(self.collection, [letter.doc for letter in letters])
        except PyMongoError as exc:
            raise TransientError(f"MongoDB: cannot keep dead letters: {exc}") from exc

    def get(self, source: Source) -> Doc | None:
        return self.collection.find_one({"_id": str(source)})

    def mark_replayed(self, source: Source, to: str) -> None:
        """Note on the original that it was re-sent (``to``: the dead letter re-sent)."""
        self.collection.update_one(
            {"_id": str(source)}, {"$push": {"replays": {"from": to, "at": time.time()}}}
        )

    def replayed(self, sources: Sequence[Source]) -> set[Source]:
        """Which of these dead letters were replayed already."""
        wanted = {str(source): source for source in sources}
        found = self.collection.find(
            {"_id": {"$in": list(wanted)}, "replays": {"$exists": True}}, {"_id": 1}
        )
        return {wanted[doc["_id"]] for doc in found}

    def find_command(self, kind: str, ident: int | str) -> list[Doc]:
        """Dead letters of the command with this id (a scan: dead letters are few)."""
        return list(self.collection.find({"kind": kind, "id": ident}).sort("at", 1))


def header_map(headers: Sequence[tuple[str, str | bytes | None]] | None) -> Mapping[str, str]:
    """Headers as text, the last value of a repeated name winning."""
    return {k: _bytes(v).decode(errors="replace") for k, v in (headers or [])}


def dead_letter_source(headers: Sequence[tuple[str, str | bytes | None]] | None) -> Source | None:
    found = header_map(headers)
    try:
        return Source(
            found[H_SOURCE_TOPIC], int(found[H_SOURCE_PARTITION]), int(found[H_SOURCE_OFFSET])
        )
    except (KeyError, ValueError):
        return None
