"""Redis cache-aside for product reads (key ``product_<id>``), as in the seed.

The cache is an optimisation only: every Redis error is counted, logged once in a while and
treated as a miss, so an outage slows reads down but never stops or corrupts stock updates.
Entries expire after ``cache_ttl_seconds`` as a last bound on staleness.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from bson import json_util

from stockflow.config import Settings

log = logging.getLogger(__name__)

Product = dict[str, Any]


def redis_client(settings: Settings) -> redis.Redis:
    """A client for the configured Redis with short timeouts (a slow cache is a miss)."""
    return redis.Redis.from_url(
        settings.redis_dsn,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
    )


class ProductCache:
    """Products cached as JSON under ``<prefix><product_id>``."""

    def __init__(self, client: redis.Redis, *, prefix: str = "product_", ttl_seconds: int = 300):
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self._last_warning = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> ProductCache:
        return cls(client, prefix=settings.cache_key_prefix, ttl_seconds=settings.cache_ttl_seconds)

    def key(self, product_id: int) -> str:
        return f"{self.prefix}{product_id}"

    def get(self, product_id: int) -> Product | None:
        """The cached product, or None on a miss or when Redis cannot be reached."""
        try:
            raw = self.client.get(self.key(product_id))
        except redis.RedisError as exc:
            self._failed("read", exc)
            return None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        product: Product = json_util.loads(raw)
        return product

    def put(self, product_id: int, product: Product) -> None:
        try:
            self.client.set(self.key(product_id), json_util.dumps(product), ex=self.ttl_seconds)
        except redis.RedisError as exc:
            self._failed("fill", exc)

    def invalidate(self, product_id: int) -> None:
        try:
            self.client.delete(self.key(product_id))
        except redis.RedisError as exc:
            self._failed("invalidate", exc)

    def _failed(self, what: str, exc: redis.RedisError) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("Redis unavailable (%s skipped, reading MongoDB instead): %s", what, exc)
