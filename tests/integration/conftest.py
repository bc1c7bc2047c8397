"""Fixtures on the real services: the local stack (or the user's, from the environment).

Every test gets its own topics, database and cache prefix, so tests never see each other's
data and the user's own data in the default database is never touched.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Consumer

from stockflow.config import Settings, load_settings
from stockflow.outcomes import OutcomeEvent, decode_event
from stockflow.pipeline import Pipeline, open_pipeline
from stockflow.planner import Decision
from stockflow.stack import Stack
from stockflow.topics import create_topic, delete_topics
from stockflow.worker import Worker


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings of a running stack: started (or found running) once per session."""
    settings = load_settings()
    Stack(settings).up()
    return settings


def isolated(stack_settings: Settings, partitions: int = 1) -> Settings:
    tag = uuid.uuid4().hex[:10]
    s = stack_settings.model_copy(
        update={
            "topic": f"test-orders-{tag}",
            "database": f"stockflow_test_{tag}",
            "cache_key_prefix": f"test_{tag}_product_",
            "group_id": f"test-group-{tag}",
            "commands_partitions": 3,
            "batch_size": 200,
        }
    )
    create_topic(s, s.topic, partitions=partitions)
    return s


def cleanup(s: Settings) -> None:
    """Drop the test's database, cache entries and topics (a lean broker restarts fast)."""
    delete_topics(s, [s.topic, s.commands_topic, s.dlq_topic, s.outcomes_topic])
    with open_pipeline(s, check=False) as pipeline:
        pipeline.mongo.drop_database(s.database)
        keys = list(pipeline.redis.scan_iter(match=f"{s.cache_key_prefix}*"))
        if keys:
            pipeline.redis.delete(*keys)


@pytest.fixture
def settings(stack_settings: Settings) -> Iterator[Settings]:
    """Settings with a fresh topic, database and cache prefix for this test."""
    s = isolated(stack_settings)
    yield s
    cleanup(s)


@pytest.fixture
def pipeline(settings: Settings) -> Iterator[Pipeline]:
    with open_pipeline(settings) as p:
        yield p


@dataclass
class Run:
    """What a bounded worker run saw: the applier's decisions and the router's dead letters."""

    decisions: list[Decision] = field(default_factory=list)
    dead_letters: int = 0

    @property
    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.decisions:
            counts[d.outcome.value] = counts.get(d.outcome.value, 0) + 1
        if self.dead_letters:
            counts["dead_lettered"] = counts.get("dead_lettered", 0) + self.dead_letters
        return counts


def process(
    settings: Settings, pipeline: Pipeline, expect: int, *, timeout: float = 60, linger: float = 0.5
) -> Run:
    """Run one worker until ``expect`` messages reached an outcome, then a little longer."""
    run = Run()
    lock = threading.Lock()

    def listen(decision: Decision) -> None:
        with lock:
            run.decisions.append(decision)

    worker = Worker(settings, pipeline, listener=listen)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while deadline > time.monotonic() and not errors:
            run.dead_letters = worker.loops["router"].stats.counts["dead_lettered"]
            if len(run.decisions) + run.dead_letters >= expect:
                time.sleep(linger)
                break
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(30)
    if errors:
        raise errors[0]
    run.dead_letters = worker.loops["router"].stats.counts["dead_lettered"]
    assert len(run.decisions) + run.dead_letters >= expect, f"only {run.outcomes} in {timeout}s"
    return run


def read_topic(settings: Settings, topic: str, *, timeout: float = 10) -> list[object]:
    """Every committed message of ``topic`` (read_committed), from the beginning."""
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
    )
    consumer.subscribe([topic])
    messages: list[object] = []
    eof: set[int] = set()
    deadline = time.monotonic() + timeout
    partitions: int | None = None
    try:
        while deadline > time.monotonic():
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                eof.add(msg.partition())
                if partitions is None:
                    meta = consumer.list_topics(topic, timeout=5)
                    partitions = len(meta.topics[topic].partitions)
                if len(eof) >= partitions:
                    break
                continue
            eof.discard(msg.partition())
            messages.append(msg)
    finally:
        consumer.close()
    return messages


def outcome_events(settings: Settings) -> list[OutcomeEvent]:
    return [decode_event(m.value()) for m in read_topic(settings, settings.outcomes_topic)]  # type: ignore[attr-defined]
