"""Fixtures on the real services: the local stack (or the user's, from the environment).

Every test gets its own topic and database, so tests never see each other's data and the
user's own data in the default database is never touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from stockflow.config import Settings, load_settings
from stockflow.consumer import OrderConsumer, RunStats
from stockflow.pipeline import Pipeline, open_pipeline
from stockflow.stack import Stack
from stockflow.topics import create_topic


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings of a running stack: started (or found running) once per session."""
    settings = load_settings()
    Stack(settings).up()
    return settings


@pytest.fixture
def settings(stack_settings: Settings) -> Iterator[Settings]:
    """Settings with a fresh topic, database and cache prefix for this test."""
    tag = uuid.uuid4().hex[:10]
    s = stack_settings.model_copy(
        update={
            "topic": f"test-orders-{tag}",
            "database": f"stockflow_test_{tag}",
            "cache_key_prefix": f"test_{tag}_product_",
            "group_id": f"test-group-{tag}",
        }
    )
    create_topic(s, s.topic, partitions=1)
    yield s
    with open_pipeline(s, check=False) as pipeline:
        pipeline.mongo.drop_database(s.database)
        keys = list(pipeline.redis.scan_iter(match=f"{s.cache_key_prefix}*"))
        if keys:
            pipeline.redis.delete(*keys)


@pytest.fixture
def pipeline(settings: Settings) -> Iterator[Pipeline]:
    with open_pipeline(settings) as p:
        yield p


def consume(settings: Settings, pipeline: Pipeline, count: int, timeout: float = 30) -> RunStats:
    """Run a bounded consumer until ``count`` messages are processed (or it idles out)."""
    return OrderConsumer(settings, pipeline.processor).run(max_messages=count, idle_timeout=timeout)
