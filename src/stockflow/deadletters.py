"""Dead letters: the record of a message that cannot be handled, with the reason in headers.

A dead letter on ``<topic>.dlq`` carries the original bytes and headers, plus the reason, the
source position on the input topic, the time and the number of attempts as headers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from stockflow.outcomes import Headers, Source

H_REASON = "stockflow.dlq.reason"
H_SOURCE_TOPIC = "stockflow.dlq.source.topic"
H_SOURCE_PARTITION = "stockflow.dlq.source.partition"
H_SOURCE_OFFSET = "stockflow.dlq.source.offset"
H_TIME = "stockflow.dlq.time"
H_ATTEMPTS = "stockflow.dlq.attempts"


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")


def dead_letter_headers(
    reason: str,
    source: Source,
    *,
    attempts: int = 1,
    original: Any = None,
) -> Headers:
    """The original message's headers, then the reason, source and time of dead-lettering."""
    items = original.items() if isinstance(original, Mapping) else (original or [])
    headers: Headers = [(k, _bytes(v)) for k, v in items if not str(k).startswith("stockflow.dlq.")]
    headers += [
        (H_REASON, reason.encode()),
        (H_SOURCE_TOPIC, source.topic.encode()),
        (H_SOURCE_PARTITION, str(source.partition).encode()),
        (H_SOURCE_OFFSET, str(source.offset).encode()),
        (H_TIME, f"{time.time():.3f}".encode()),
        (H_ATTEMPTS, str(attempts).encode()),
    ]
    return headers


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
