"""Kafka refusing stockflow's credentials or ACLs is a configuration error (exit 78), never an
outage to wait out: the admin calls and the loop's consumer say so (constructed errors)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stockflow import topics
from stockflow.config import Settings
from stockflow.errors import AccessDeniedError, KafkaUnavailableError
from tests.unit.kafka_fakes import FakeConsumer, FakeKafka
from tests.unit.test_consumer import IN, EchoHandler, make_loop

SASL = KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "Authentication failed: bad password")


class _Admin:
    def __init__(self, error: KafkaError) -> None:
        self.error = error

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:
        raise KafkaException(self.error)


def test_require_topic_says_kafka_refused_the_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics, "admin_client", lambda s: _Admin(SASL))
    with pytest.raises(AccessDeniedError) as caught:
        topics.require_topic(Settings(), "orders")
    assert "refused stockflow's credentials" in str(caught.value)


def test_require_topic_still_says_kafka_is_away_when_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    away = KafkaError(KafkaError._TRANSPORT, "Connection refused")
    monkeypatch.setattr(topics, "admin_client", lambda s: _Admin(away))
    with pytest.raises(KafkaUnavailableError):
        topics.require_topic(Settings(), "orders")


class _ErrorMessage:
    def __init__(self, error: KafkaError) -> None:
        self._error = error

    def error(self) -> KafkaError:
        return self._error


class _RefusedConsumer(FakeConsumer):
    """A member whose polls answer with the broker's refusal of the topic (an ACL)."""

    def poll(self, timeout: float) -> Any:
        self._serve()
        return _ErrorMessage(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not allowed"))


def test_the_loop_stops_on_an_authorization_error_instead_of_idling() -> None:
    kafka = FakeKafka()
    kafka.add(IN, 0, b"a")
    loop = make_loop(kafka, EchoHandler())
    loop._consumer_factory = lambda config: _RefusedConsumer(kafka)
    with pytest.raises(AccessDeniedError):
        loop.run(idle_timeout=1)
    assert kafka.outputs == []
