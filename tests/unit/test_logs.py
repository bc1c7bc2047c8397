"""Logging: librdkafka's lines through Python logging, levels by -v, secrets never shown."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from stockflow.config import KAFKA_LOGGER, Settings
from stockflow.logs import ScrubbingFormatter, setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    kafka_level = logging.getLogger(KAFKA_LOGGER).level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(KAFKA_LOGGER).setLevel(kafka_level)


def test_librdkafka_lines_go_through_python_logging(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Not librdkafka's own ``%3|...|FAIL|`` lines on stderr: records of stockflow's logger."""
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9")  # nothing listens there
    caplog.set_level(logging.DEBUG, logger=KAFKA_LOGGER)
    producer = Producer(settings.kafka_config(**{"reconnect.backoff.ms": 50}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not caplog.records:
        producer.poll(0.2)
    producer.flush(0)
    records = [r for r in caplog.records if r.name == KAFKA_LOGGER]
    assert records and records[0].levelno >= logging.WARNING
    assert "Connection refused" in records[0].getMessage()
    assert "%3|" not in capfd.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_librdkafka_shows_warnings_only_and_everything_with_verbose() -> None:
    setup_logging(verbose=False, timestamps=False)
    kafka = logging.getLogger(KAFKA_LOGGER)
    assert kafka.isEnabledFor(logging.WARNING) and not kafka.isEnabledFor(logging.INFO)
    assert not logging.getLogger("pymongo").isEnabledFor(logging.INFO)
    setup_logging(verbose=True, timestamps=True)
    assert kafka.isEnabledFor(logging.DEBUG)
    assert logging.getLogger("stockflow.txloop").isEnabledFor(logging.DEBUG)


def test_no_secret_in_a_formatted_line_or_its_traceback() -> None:
    formatter = ScrubbingFormatter("%(levelname)s %(message)s", ["s3cret-pw"])
    try:
        raise RuntimeError("cannot connect to mongodb://app:s3cret-pw@h/")
    except RuntimeError:
        import sys

        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed with %s", ("s3cret-pw",), sys.exc_info()
        )
    line = formatter.format(record)
    assert "s3cret-pw" not in line and "***" in line and "RuntimeError" in line
