"""The exceptions stockflow raises: one root, one line a case, each saying what went wrong."""

from __future__ import annotations


class StockflowError(Exception):
    """Root of every error stockflow raises on purpose."""


class ConfigError(StockflowError):
    """A setting is missing or has a value stockflow cannot use."""


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


class TopicError(StockflowError):
    """A topic could not be created, listed or described."""


class TransientError(StockflowError):
    """A failure worth retrying: a service is down or busy, or a write raced another."""


class ConcurrentWriteError(TransientError):
    """A product changed between reading it and writing it: another writer is active."""
