"""The MongoDB client."""

from __future__ import annotations

from typing import Any

from pymongo import MongoClient

from stockflow.config import Settings

Doc = dict[str, Any]


def mongo_client(settings: Settings) -> MongoClient[Doc]:
    """A client for the configured server (a real MongoDB or the local FerretDB)."""
    return MongoClient(
        settings.mongodb_url,
        serverSelectionTimeoutMS=settings.mongodb_timeout_ms,
        appname="stockflow",
        tz_aware=True,
    )
