"""End offsets read while a partition's leadership moves (a broker killed or restarted)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from stockflow.config import Settings
from stockflow.errors import TopicError
from stockflow.topics import latest_offsets


class Admin:
    """Answers ``list_offsets`` from a script: per call, per partition, an offset or an error
    code; records which partitions each call asked for."""

    def __init__(self, script: list[dict[int, int]]) -> None:
        self.script = script
        self.asked: list[set[int]] = []

    def list_offsets(self, wanted: dict[TopicPartition, Any], **_: Any) -> dict[Any, Future[Any]]:
        answers = self.script[min(len(self.asked), len(self.script) - 1)]
        self.asked.append({tp.partition for tp in wanted})
        futures: dict[Any, Future[Any]] = {}
        for tp in wanted:
            future: Future[Any] = Future()
            answer = answers[tp.partition]
            if answer < 0:
                future.set_exception(KafkaException(KafkaError(-answer)))
            else:
                future.set_result(SimpleNamespace(offset=answer))
            futures[tp] = future
        return futures


def _read(admin: Admin, tmp_path: Path, timeout: float = 10) -> dict[tuple[str, int], int]:
    settings = Settings(state_dir=tmp_path, kafka_timeout_seconds=timeout)
    return latest_offsets(settings, [("t", 0), ("t", 1)], admin=cast(AdminClient, admin))


def test_a_partition_whose_leader_moves_is_asked_again_until_it_answers(tmp_path: Path) -> None:
    """Seen in the three-broker chaos run: UNKNOWN_LEADER_EPOCH right after a leader was
    killed failed `topics describe` (and the scenario) at once."""
    moving = -KafkaError.UNKNOWN_LEADER_EPOCH
    admin = Admin([{0: 40, 1: moving}, {0: 40, 1: moving}, {0: 40, 1: 17}])
    assert _read(admin, tmp_path) == {("t", 0): 40, ("t", 1): 17}
    assert admin.asked == [{0, 1}, {1}, {1}]


def test_an_error_about_the_request_is_not_retried(tmp_path: Path) -> None:
    admin = Admin([{0: 40, 1: -KafkaError.TOPIC_AUTHORIZATION_FAILED}])
    with pytest.raises(TopicError, match="cannot read end offsets"):
        _read(admin, tmp_path)
    assert len(admin.asked) == 1


def test_a_leader_that_never_settles_ends_in_one_error_within_the_timeout(
    tmp_path: Path,
) -> None:
    admin = Admin([{0: 40, 1: -KafkaError.NOT_LEADER_FOR_PARTITION}])
    with pytest.raises(TopicError, match=r"1 partition\(s\) within 1s"):
        _read(admin, tmp_path, timeout=1)
    assert 1 < len(admin.asked) <= 3
