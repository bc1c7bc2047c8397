"""stockflow: a real-time order -> stock pipeline (Kafka -> MongoDB, Redis-cached reads)."""

__version__ = "0.1.0"
