"""Settings: seed defaults, the standard service variables, and masked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockflow.config import Settings, mask_url


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "MONGODB_URI", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_seed_names_and_the_local_stack() -> None:
    s = Settings()
    assert (s.topic, s.database, s.products_collection, s.cache_key_prefix) == (
        "my-order-updates2",
        "ecommerce",
        "products",
        "product_",
    )
    assert s.kafka_bootstrap == f"127.0.0.1:{s.kafka_port}"
    assert s.mongodb_url == f"mongodb://127.0.0.1:{s.ferretdb_port}/"
    assert s.redis_dsn == f"redis://127.0.0.1:{s.redis_port}/0"
    assert not any(s.is_external(name) for name in ("kafka", "mongodb", "redis"))


def test_standard_variables_point_at_existing_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker1:9092,broker2:9092")
    monkeypatch.setenv("MONGODB_URI", "mongodb://app:s3cret@db.example:27017/")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@cache:6379/1")
    s = Settings()
    assert s.kafka_bootstrap == "broker1:9092,broker2:9092"
    assert s.mongodb_url == "mongodb://app:s3cret@db.example:27017/"
    assert all(s.is_external(name) for name in ("kafka", "mongodb", "redis"))
    shown = s.addresses()
    assert "s3cret" not in shown["mongodb"] and "pw" not in shown["redis"]
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)


def test_prefixed_variables_and_empty_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKFLOW_TOPIC", "orders")
    monkeypatch.setenv("STOCKFLOW_REDIS_PORT", "6400")
    monkeypatch.setenv("MONGODB_URI", "")
    s = Settings()
    assert s.topic == "orders"
    assert s.redis_dsn == "redis://127.0.0.1:6400/0"
    assert not s.is_external("mongodb")


def test_state_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(state_dir=Path("st")).state_dir == tmp_path / "st"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mongodb://u:p@h:1/db", "mongodb://u:***@h:1/db"),
        ("redis://:p@h:6379/0", "redis://:***@h:6379/0"),
        ("mongodb://h:1/", "mongodb://h:1/"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown
