"""Logging for the command line: one format, library noise kept down, secrets never shown.

- stockflow's own lines go to stdout (the seed printed its per-order lines there);
- librdkafka's lines reach Python logging through the ``logger`` hook of every Kafka client
  (``Settings.kafka_config``), under ``stockflow.librdkafka``: warnings and worse (syslog
  levels 0-4) are shown, everything with ``-v``;
- pymongo and the other libraries speak only when something is wrong (warnings), or with
  ``-v`` for stockflow's own debug lines;
- every formatted line, tracebacks included, has the passwords of the configured service
  addresses replaced by ``***`` (:class:`ScrubbingFormatter`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from stockflow.config import KAFKA_LOGGER, MASK

QUIET_LIBRARIES = ("pymongo", "urllib3", "asyncio", "kafka", "redis")


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so none leaks in part)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class ScrubbingFormatter(logging.Formatter):
    """A formatter whose output (message, traceback, everything) never holds a secret."""

    def __init__(self, fmt: str, secrets: Iterable[str]) -> None:
        super().__init__(fmt)
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record), self.secrets)


class KafkaLineFilter(logging.Filter):
    """librdkafka's ``FACILITY [client] text`` lines as ``Kafka (client): text``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 3:
            _, client, text = record.args
            record.msg, record.args = "Kafka (%s): %s", (client, text)
        return True


_kafka_filter = KafkaLineFilter()


def setup_logging(*, verbose: bool, timestamps: bool, secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once for a command (and the worker child it may start)."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if timestamps else "%(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(ScrubbingFormatter(fmt, secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # librdkafka's INFO (syslog 5-6) lines are routine (connections, rebalances): -v only.
    kafka = logging.getLogger(KAFKA_LOGGER)
    kafka.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if _kafka_filter not in kafka.filters:
        kafka.addFilter(_kafka_filter)
