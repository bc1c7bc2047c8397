"""Order decoding: every valid shape accepted, every bad one refused with a reason."""

from __future__ import annotations

import json
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockflow.errors import InvalidOrderError
from stockflow.orders import MAX_MESSAGE_BYTES, Order, decode_order, validate


def test_seed_message_decodes() -> None:
    order = decode_order(b'{"orderId": 1, "productId": 101, "quantity": 1}')
    assert order == Order(order_id=1, product_id=101, quantity=1)


def test_string_order_id_and_extra_fields_are_accepted() -> None:
    order = decode_order(b'{"orderId":"A-7","productId":5,"quantity":2,"customerId":"c1"}')
    assert (order.order_id, order.product_id, order.quantity) == ("A-7", 5, 2)


def test_encode_round_trips_with_the_seed_field_names() -> None:
    order = Order(order_id=3, product_id=101, quantity=3)
    assert json.loads(order.encode()) == {"orderId": 3, "productId": 101, "quantity": 3}
    assert decode_order(order.encode()) == order
    assert order.key == b"101"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty message"),
        (b"not json", "malformed JSON"),
        (b"[1, 2]", "invalid order"),
        (b'{"orderId": 1, "productId": 101}', "quantity"),
        (b'{"orderId": 1, "productId": "101", "quantity": 1}', "productId"),
        (b'{"orderId": 1, "productId": 101, "quantity": 1.5}', "quantity"),
        (b'{"orderId": 1, "productId": 101, "quantity": true}', "quantity"),
        (b'{"orderId": 1, "productId": 101, "quantity": 0}', "at least 1"),
        (b'{"orderId": 1, "productId": 101, "quantity": -5}', "at least 1"),
        (b'{"orderId": 1, "productId": 101, "quantity": 1000000}', "exceeds the maximum"),
        (b'{"orderId": 1, "productId": -1, "quantity": 1}', "positive"),
        (b'{"orderId": "", "productId": 101, "quantity": 1}', "orderId is empty"),
        (b'{"orderId": null, "productId": 101, "quantity": 1}', "orderId"),
        (b'{"orderId": 1, "productId": {"$gt": 0}, "quantity": 1}', "productId"),
        (b'{"orderId": {"$ne": null}, "productId": 101, "quantity": 1}', "orderId"),
        (b'{"orderId": 1, "productId": 101, "quantity": {"$inc": 5}}', "quantity"),
        (b'\xff\xfe{"orderId": 1}', "UTF-8"),
        (b"{" + b" " * MAX_MESSAGE_BYTES + b"}", "exceeds the"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidOrderError) as caught:
        decode_order(payload)
    assert reason in caught.value.reason


def test_maximum_quantity_is_configurable() -> None:
    payload = b'{"orderId": 1, "productId": 101, "quantity": 50}'
    assert decode_order(payload, max_quantity=50).quantity == 50
    with pytest.raises(InvalidOrderError, match="exceeds the maximum of 49"):
        decode_order(payload, max_quantity=49)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_either_decode_or_raise_invalid_order(payload: bytes) -> None:
    try:
        order = decode_order(payload)
    except InvalidOrderError as exc:
        assert exc.reason
    else:
        assert order.quantity >= 1 and order.product_id >= 1


@given(
    st.one_of(
        st.integers(-(2**53) + 1, 2**53 - 1),
        st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=128).filter(
            str.strip
        ),
    ),
    st.integers(1, 2**53 - 1),
    st.integers(1, 10_000),
)
def test_every_valid_order_round_trips(order_id: int | str, product_id: int, qty: int) -> None:
    order = Order(order_id=order_id, product_id=product_id, quantity=qty)
    assert decode_order(order.encode()) == order


def test_customer_id_is_optional_and_kept() -> None:
    order = decode_order(b'{"orderId": 1, "productId": 101, "quantity": 1, "customerId": 42}')
    assert order.customer_id == 42
    assert json.loads(order.encode())["customerId"] == 42
    plain = decode_order(b'{"orderId": 1, "productId": 101, "quantity": 1}')
    assert plain.customer_id is None and "customerId" not in json.loads(plain.encode())


@pytest.mark.parametrize(
    ("customer", "reason"),
    [
        (b'""', "customerId is empty"),
        (b'"' + b"c" * 129 + b'"', "customerId longer than 128"),
        (b'{"$gt": 0}', "customerId"),
        (b"1.5", "customerId"),
        (b"true", "customerId"),
        (str(2**60).encode(), "customerId is out of"),
    ],
)
def test_a_bad_customer_id_is_refused(customer: bytes, reason: str) -> None:
    payload = b'{"orderId": 1, "productId": 101, "quantity": 1, "customerId": ' + customer + b"}"
    with pytest.raises(InvalidOrderError) as caught:
        decode_order(payload)
    assert reason in caught.value.reason


ORDER_HEAD = b'{"orderId": 1, "productId": 101, "quantity": 1, "extra": '


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * 1000 + b"]" * 1000, "nested"),
        (b'{"a":' * 1000 + b"1" + b"}" * 1000, "nested"),
        (ORDER_HEAD + b"[" * 1000 + b"]" * 1000 + b"}", "nested"),
        (ORDER_HEAD + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested"),
        (b'{"orderId": 1, "productId": 1' + b"0" * 5000 + b', "quantity": 1}', "productId"),
        (b'{"orderId": 1, "productId": 1' + b"0" * 400 + b', "quantity": 1}', "productId"),
        (b'{"orderId": 1, "productId": 101, "quantity": 9' + b"9" * 400 + b"}", "quantity"),
        (b'{"orderId": 1, "productId": 101, "quantity": 9' + b"9" * 5000 + b"}", "quantity"),
        (b'{"orderId": 1' + b"0" * 5000 + b', "productId": 101, "quantity": 1}', "orderId"),
        (b'{"orderId": 1e999, "productId": 101, "quantity": 1}', "orderId"),
        (b'{"orderId": 1, "productId": 101, "quantity": NaN}', "malformed JSON"),
        (b'{"orderId": 1, "productId": 101, "quantity": Infinity}', "malformed JSON"),
        (b'{"orderId": "a\\u0000b", "productId": 101, "quantity": 1}', "control character"),
        (b'{"orderId": "a\x00b", "productId": 101, "quantity": 1}', "malformed JSON"),
        (b'{"orderId": "\\ud800", "productId": 101, "quantity": 1}', "malformed JSON"),
        (b'{"orderId": "' + b"x" * 60_000 + b'", "productId": 101, "quantity": 1}', "longer"),
        (b'"an order"', "object"),
        (b"null", "object"),
        (b"42", "object"),
        (b"true", "object"),
        (b"\x00" * 10, "malformed JSON"),
    ],
)
def test_poison_messages_are_refused_with_a_short_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidOrderError) as caught:
        decode_order(payload)
    assert reason in caught.value.reason
    assert len(caught.value.reason) <= 200  # a reason is a line, not the payload again


def test_nesting_within_the_limit_is_accepted_in_extra_fields() -> None:
    nested = b'{"a": ' * 20 + b"1" + b"}" * 20
    order = decode_order(ORDER_HEAD + nested + b"}")
    assert order == Order(order_id=1, product_id=101, quantity=1)
    # brackets inside strings are text, not nesting
    assert decode_order(ORDER_HEAD + b'"' + b"[{" * 2000 + b'"}').quantity == 1
    assert decode_order(ORDER_HEAD + b'"\\"' + b"[" * 2000 + b'"}').quantity == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=40,
)


@given(json_values, st.integers(0, 3000))
def test_any_json_at_any_depth_decodes_or_raises_invalid_order(value: object, depth: int) -> None:
    payload = b"[" * depth + json.dumps(value).encode() + b"]" * depth
    for candidate in (payload, ORDER_HEAD + payload + b"}"):
        try:
            decode_order(candidate)
        except InvalidOrderError as exc:
            assert exc.reason and len(exc.reason) <= 200


def test_exactly_the_unicode_control_characters_are_refused_in_ids() -> None:
    # The check is two C-speed calls, not a category lookup per character: it must still
    # refuse every character of category Cc (and only those), wherever it stands.
    refused = set()
    for code in range(sys.maxunicode + 1):
        if 0xD800 <= code <= 0xDFFF:
            continue  # surrogates: not valid in JSON text (refused as malformed)
        try:
            validate(Order(order_id=f"a{chr(code)}b", product_id=101, quantity=1))
        except InvalidOrderError as exc:
            assert "control character" in exc.reason
            refused.add(code)
    cc = {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cc"}
    assert refused == cc
