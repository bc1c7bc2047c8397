"""Building dead letters: whatever the message, the dead letter fits the producer's limit."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockflow.deadletters import (
    H_SHA256,
    H_SIZE,
    H_TRUNCATED,
    PRODUCER_MAX_BYTES,
    build,
    header_map,
)
from stockflow.dlq import DeadLetter, select
from stockflow.errors import StockflowError
from stockflow.outcomes import Source

SOURCE = Source("orders", 3, 1234)


def wire_size(value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """What librdkafka weighs against message.max.bytes (framing counted generously)."""
    framing = 64 + 10 * len(headers)
    return framing + len(value or b"") + len(key or b"") + sum(len(k) + len(v) for k, v in headers)


def test_a_small_message_travels_whole_with_its_size_and_digest() -> None:
    letter = build(
        value=b"not json",
        key=b"k",
        original_headers=[("trace", b"t1")],
        reason="malformed JSON",
        source=SOURCE,
        attempts=1,
        stage="router",
        limit=PRODUCER_MAX_BYTES,
    )
    found = header_map(letter.headers)
    assert letter.value == b"not json" and letter.key == b"k" and letter.truncated == ()
    assert found["trace"] == "t1" and H_TRUNCATED not in found
    assert found[H_SIZE] == "8" and found[H_SHA256] == hashlib.sha256(b"not json").hexdigest()
    assert letter.doc["_id"] == "orders[3]@1234" and letter.doc["value"] == b"not json"


@given(
    value=st.integers(0, 2_000_000),
    key=st.integers(0, 1_500_000),
    headers=st.lists(st.integers(0, 600_000), max_size=4),
    reason=st.integers(0, 100_000),
)
def test_every_dead_letter_fits_and_keeps_the_original_whole_in_its_document(
    value: int, key: int, headers: list[int], reason: int
) -> None:
    payload = b"v" * value
    original_headers = [(f"h{i}", b"h" * size) for i, size in enumerate(headers)]
    letter = build(
        value=payload,
        key=b"k" * key,
        original_headers=original_headers,
        reason="r" * reason,
        source=SOURCE,
        attempts=5,
        stage="router",
        limit=PRODUCER_MAX_BYTES,
    )
    as_bytes = [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in letter.headers]
    assert wire_size(letter.value, letter.key, as_bytes) <= PRODUCER_MAX_BYTES
    assert letter.doc["value"] == payload and letter.doc["key"] == b"k" * key
    assert [(h["name"], h["value"]) for h in letter.doc["headers"]] == original_headers
    cut = set(letter.truncated)
    assert ("value" in cut) == (letter.value != payload)
    assert ("key" in cut) == (letter.key != b"k" * key)
    assert payload.startswith(letter.value or b"")
    if cut:
        assert header_map(letter.headers)[H_TRUNCATED] == ",".join(letter.truncated)
    # nothing is cut while everything fits with room to spare (keys over a quarter are dropped)
    if value + key + sum(headers) < 500_000 and key < 200_000:
        assert not cut


def _letter(ref: str, reason: str) -> DeadLetter:
    partition, offset = (int(part) for part in ref.split(":"))
    return DeadLetter(partition, offset, None, b"x", reason, SOURCE, None, 1, [])


def test_replay_selection_by_ref_reason_and_all_keeps_topic_order() -> None:
    letters = [
        _letter("0:1", "malformed JSON"),
        _letter("0:2", "product 7 has an unusable stock value 'plenty'"),
        _letter("1:0", "Unusable stock again"),
    ]
    refs = [letter.ref for letter in select(letters, reason="unusable stock")]
    assert refs == ["0:2", "1:0"]
    assert [letter.ref for letter in select(letters, refs=["1:0", "0:1"])] == ["0:1", "1:0"]
    assert [letter.ref for letter in select(letters, every=True)] == ["0:1", "0:2", "1:0"]
    assert select(letters, reason="nothing like it") == []
    with pytest.raises(StockflowError, match="no dead letter 2:0"):
        select(letters, refs=["2:0"])
    with pytest.raises(StockflowError, match="not a dead letter ref"):
        select(letters, refs=["0-1"])
