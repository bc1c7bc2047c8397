"""Wiring: the clients and parts of the pipeline, built from the settings and closed together."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from stockflow.cache import ProductCache, redis_client
from stockflow.catalog import ProductReader
from stockflow.config import Settings
from stockflow.errors import AccessDeniedError, ServiceUnavailableError
from stockflow.inventory import Inventory, Product
from stockflow.mongo import auth_error, mongo_client


@dataclass
class Pipeline:
    """The MongoDB and Redis sides of the pipeline (Kafka clients are per command)."""

    settings: Settings
    mongo: MongoClient[Product]
    redis: redis.Redis
    inventory: Inventory
    cache: ProductCache
    reader: ProductReader
    pool: ThreadPoolExecutor
    """Runs MongoDB commands side by side (``mongodb_concurrency`` at a time)."""


@contextmanager
def open_pipeline(settings: Settings, *, check: bool = True) -> Iterator[Pipeline]:
    """Connect to MongoDB and Redis; with ``check``, fail fast if MongoDB does not answer."""
    mongo = mongo_client(settings)
    cache_client = redis_client(settings)
    pool = ThreadPoolExecutor(settings.mongodb_concurrency, thread_name_prefix="stockflow-mongo")
    try:
        inventory = Inventory.from_settings(settings, mongo, pool=pool)
        if check:
            try:
                mongo.admin.command("ping")
                inventory.ensure_indexes()
            except PyMongoError as exc:
                refused = auth_error(exc, data_free=True)  # a ping and indexes: no data
                if refused is not None:
                    raise AccessDeniedError(
                        f"MongoDB at {settings.addresses()['mongodb']} refused stockflow's "
                        f"credentials or permissions ({refused}): check the user and password "
                        "in MONGODB_URI and that user's roles"
                    ) from None
                raise ServiceUnavailableError(
                    f"MongoDB at {settings.addresses()['mongodb']} is not reachable: "
                    f"{_first_line(exc)}. Start the local stack with `stockflow stack up` or "
                    "set MONGODB_URI."
                ) from None
        cache = ProductCache.from_settings(settings, cache_client)
        yield Pipeline(
            settings, mongo, cache_client, inventory, cache, ProductReader(inventory, cache), pool
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        mongo.close()
        cache_client.close()


def _first_line(exc: PyMongoError) -> str:
    """What went wrong, without pymongo's topology description (one line)."""
    text = str(exc).split(", Timeout:")[0].split(", full error:")[0]
    return " ".join(text.split())[:300]
