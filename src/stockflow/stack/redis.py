"""Redis from the machine's ``redis-server``, on its own port, folder and (no) persistence.

The cache holds nothing that cannot be rebuilt from MongoDB, so the local instance keeps no
snapshot or append-only file.
"""

from __future__ import annotations

from stockflow.stack.service import Reporter, Service, require_tool

HINT = "install Debian's redis-server (`make system-deps` does it)"


class RedisService(Service):
    """A redis-server bound to loopback."""

    name = "redis"
    external_kind = "redis"

    @property
    def port(self) -> int:
        return self.settings.redis_port

    @property
    def address(self) -> str:
        return self.settings.addresses()["redis"]

    def provision(self, report: Reporter) -> None:
        require_tool("redis-server", HINT)

    def prepare(self, report: Reporter) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        return [
            require_tool("redis-server", HINT),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir / "data"),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--maxmemory", "256mb",
            "--maxmemory-policy", "allkeys-lru",
        ]  # fmt: skip

    def probe(self) -> str | None:
        import redis

        client = redis.Redis.from_url(
            self.settings.redis_dsn, socket_timeout=1.5, socket_connect_timeout=1.5
        )
        try:
            info = client.info("server")
        except redis.RedisError:
            return None
        finally:
            client.close()
        return f"Redis {info.get('redis_version', '?')}"
