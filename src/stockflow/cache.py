"""Redis cache-aside for product reads (key ``product_<id>``), as in the seed, made race-free.

Every cached product carries a version: the count of changes written to it (``_stockflow.v``,
-1 before any; see ``planner``). A Lua script stores an entry only if it is newer
than what Redis holds, so a reader that loaded a product just before a change can never put
the old stock back after the writer refreshed the entry. The writer refreshes entries after
each batch (write-through); when Redis is unreachable it remembers the products and deletes
their entries once Redis answers again, so an outage never leaves stale stock behind for
longer than that.

The cache is an optimisation only: every Redis error is counted, logged once in a while and
treated as a miss, so an outage slows reads down but never stops or corrupts stock updates.
Entries also expire after ``cache_ttl_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from bson import json_util

from stockflow.config import Settings
from stockflow.planner import marker_version

log = logging.getLogger(__name__)

Product = dict[str, Any]
VERSION = "_v"

_STORE_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and type(decoded) == 'table' and decoded['_v'] ~= nil
     and tonumber(decoded['_v']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


def redis_client(settings: Settings) -> redis.Redis:
    """A client for the configured Redis with short timeouts (a slow cache is a miss)."""
    return redis.Redis.from_url(
        settings.redis_dsn,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
    )


def product_version(product: Mapping[str, Any]) -> int:
    """The version of a product document: it grows with every change, -1 before any."""
    return marker_version(product)


def public_view(product: Mapping[str, Any]) -> Product:
    """The product as readers see it: without ``_id`` and stockflow's bookkeeping."""
    return {k: v for k, v in product.items() if k not in ("_id", "_stockflow", VERSION)}


class ProductCache:
    """Products cached as JSON under ``<prefix><product_id>``."""

    def __init__(self, client: redis.Redis, *, prefix: str = "product_", ttl_seconds: int = 300):
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.stale: set[int] = set()
        """Products whose entry could not be refreshed: deleted once Redis answers."""
        self._last_warning = 0.0
        self._script = client.register_script(_STORE_IF_NEWER)

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
        return public_view(json_util.loads(raw))

    def put(self, product_id: int, product: Mapping[str, Any]) -> bool:
        """Store ``product`` unless Redis holds a newer version; False if Redis failed."""
        payload = {**public_view(product), VERSION: product_version(product)}
        try:
            self._script(
                keys=[self.key(product_id)],
                args=[json_util.dumps(payload), payload[VERSION], self.ttl_seconds],
            )
        except redis.RedisError as exc:
            self._failed("fill", exc)
            return False
        return True

    def refresh(self, products: Iterable[Mapping[str, Any]]) -> None:
        """Write-through after a change (one pipelined round trip); remembers what failed."""
        self.retry_stale()
        pids: list[int] = []
        pipe = self.client.pipeline(transaction=False)
        for product in products:
            pid = int(product["product_id"])
            payload = {**public_view(product), VERSION: product_version(product)}
            self._script(
                keys=[self.key(pid)],
                args=[json_util.dumps(payload), payload[VERSION], self.ttl_seconds],
                client=pipe,
            )
            pids.append(pid)
        if not pids:
            return
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._failed("fill", exc)
            self.stale.update(pids)

    def retry_stale(self) -> None:
        """Delete the entries that could not be refreshed during an outage, if Redis is back."""
        if not self.stale:
            return
        try:
            self.client.delete(*(self.key(pid) for pid in self.stale))
        except redis.RedisError as exc:
            self._failed("invalidate", exc)
            return
        log.warning("Redis is back: dropped %d cache entr(ies) missed meanwhile", len(self.stale))
        self.stale.clear()

    def invalidate(self, product_id: int) -> None:
        try:
            self.client.delete(self.key(product_id))
        except redis.RedisError as exc:
            self.stale.add(product_id)
            self._failed("invalidate", exc)

    def _failed(self, what: str, exc: redis.RedisError) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("Redis unavailable (%s skipped, reading MongoDB instead): %s", what, exc)
