"""The exceptions stockflow raises: one root, one line a case, each saying what went wrong."""

from __future__ import annotations


class StockflowError(Exception):
    """Root of every error stockflow raises on purpose."""


class ConfigError(StockflowError):
    """A setting is missing or has a value stockflow cannot use."""


class AccessDeniedError(ConfigError):
    """A service refused stockflow's credentials or permissions: no message is at fault, and
    waiting or restarting will not help until the setting is fixed."""


class StackError(StockflowError):
    """The local stack could not be provisioned, started, stopped or inspected."""


class ToolMissingError(StackError):
    """A program the local stack needs (java, mvn, go, redis-server) is not installed."""


class ProvisionError(StackError):
    """Downloading or building a service failed."""


class PortInUseError(StackError):
    """A port stockflow wants for its own service is taken by a process it did not start."""


class ServiceStartError(StackError):
    """A service was started but did not become ready in time."""


class ServiceUnavailableError(StockflowError):
    """Kafka, MongoDB or Redis could not be reached."""


class InvalidOrderError(StockflowError):
    """A message is not a valid order; ``reason`` says why in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProduceError(StockflowError):
    """One or more messages were not acknowledged by Kafka."""


class PartitionerError(StockflowError):
    """A partitioning strategy was asked for something it cannot do (a missing partition)."""


class TopicError(StockflowError):
    """A topic could not be created, listed or described."""


class GroupError(StockflowError):
    """A consumer group could not be found or described."""


class KafkaUnavailableError(TopicError, ServiceUnavailableError):
    """Kafka did not answer a topic request: the broker is away, not the topic wrong."""


class TransientError(StockflowError):
    """A failure worth retrying: a service is down or busy, or a write raced another."""


class ConcurrentWriteError(TransientError):
    """A product changed between reading it and writing it: another writer is active;
    ``refused`` counts the product writes the compare-and-set turned down."""

    def __init__(self, message: str, *, refused: int = 0) -> None:
        super().__init__(message)
        self.refused = refused


EXIT_TEMPFAIL = 75
"""Exit status of a worker that stopped for a transient cause (a service unreachable, a hung
call): its supervisor starts a fresh one after a backoff (sysexits' EX_TEMPFAIL)."""

EXIT_CONFIG = 78
"""Exit status of a command whose settings cannot work (sysexits' EX_CONFIG): restarting it
would fail again, so a supervisor gives up at once."""
