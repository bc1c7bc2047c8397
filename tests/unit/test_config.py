"""Settings: seed defaults, the standard service variables, and masked secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockflow import kafka_clients
from stockflow.config import Settings, load_settings, mask_url
from stockflow.errors import ConfigError


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


def test_a_child_on_the_worker_environment_uses_the_same_topics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker started for settings whose outcomes topic is named apart from the input's
    (the benchmark gives each contestant its own) must not fall back to ``<topic>.outcomes``."""
    parent = Settings(topic="orders-a", outcomes_topic_name="outcomes-of-a")
    for name, value in parent.worker_environment().items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert (child.topic, child.commands_topic, child.dlq_topic, child.outcomes_topic) == (
        "orders-a",
        "orders-a.by-product",
        "orders-a.dlq",
        "outcomes-of-a",
    )


def test_state_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(state_dir=Path("st")).state_dir == tmp_path / "st"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mongodb://u:p@h:1/db", "mongodb://u:***@h:1/db"),
        ("redis://:p@h:6379/0", "redis://:***@h:6379/0"),
        ("mongodb://h:1/", "mongodb://h:1/"),
        # Several hosts (urlsplit raised on this one, and `stack status` printed a traceback).
        (
            "mongodb://app:pw@h1:1,h2:2/?replicaSet=rs0",
            "mongodb://app:***@h1:1,h2:2/?replicaSet=rs0",
        ),
        (
            "mongodb+srv://app:pw@cluster.example/db?retryWrites=true",
            "mongodb+srv://app:***@cluster.example/db?retryWrites=true",
        ),
        ("rediss://default:pw@h:6380/0", "rediss://default:***@h:6380/0"),
        ("redis://pw@h/0", "redis://***@h/0"),  # redis: a lone userinfo is the password
        ("mongodb://x509user@h/", "mongodb://x509user@h/"),  # mongodb: a lone user is a name
        (
            "mongodb://h/?authSource=admin&password=pw&tlsCertificateKeyFilePassword=k",
            "mongodb://h/?authSource=admin&password=***&tlsCertificateKeyFilePassword=***",
        ),
        ("mongodb://u:p@ss@h/", "mongodb://u:***@h/"),  # an unescaped "@" in the password
        ("mongodb://u:a?b=c@h/db", "mongodb://u:***@h/db"),  # an unescaped "?" too
        ("SASL_SSL://u:pw@b1:9092,b2:9092", "SASL_SSL://u:***@b1:9092,b2:9092"),
        ("u:pw@b1:9092", "u:***@b1:9092"),
        ("u:a://b@b1:9092", "u:***@b1:9092"),  # "://" inside a password is not a scheme
        ("b1:9092,b2:9092", "b1:9092,b2:9092"),
        ("mongodb://[::1]:27017/", "mongodb://[::1]:27017/"),
        ("", ""),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


PASSWORD = st.text(min_size=1, max_size=20).map(lambda text: f"Zq{text}Zq")
FORMS = [
    "mongodb://app:{pw}@h1:1,h2:2/?replicaSet=rs0",
    "mongodb+srv://app:{pw}@cluster.example/db?w=majority",
    "redis://:{pw}@cache:6379/0",
    "rediss://{pw}@cache:6380/1",
    "u:{pw}@broker:9092,broker2:9092",
    "mongodb://h:1/?authSource=admin&password={pw}&appName=x",
    "SASL_SSL://u:{pw}@b:9092",
    "mongodb://u:{pw}@h/?password={pw}",
]


@given(pw=PASSWORD, form=st.sampled_from(FORMS), junk=st.text(max_size=30))
def test_mask_url_never_raises_and_never_shows_the_password(pw: str, form: str, junk: str) -> None:
    if "password=" in form:
        # Inside a query a raw "&", ";" or "#" ends the value: that is URL syntax, not a leak.
        pw = re.sub(r"[&;#]", "", pw)
    url = form.format(pw=pw)
    assert pw not in mask_url(url)
    assert isinstance(mask_url(junk + url), str)
    assert isinstance(mask_url(junk), str)


def test_addresses_never_show_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "SASL_SSL://app:kafkapw@b1:9092,b2:9092")
    monkeypatch.setenv("MONGODB_URI", "mongodb://app:mongopw@h1:1,h2:2/?replicaSet=rs0")
    monkeypatch.setenv("REDIS_URL", "redis://:redispw@cache:6379/0")
    shown = " ".join(Settings().addresses().values())
    assert not {"kafkapw", "mongopw", "redispw"} & set(re.findall(r"\w+", shown))


def test_unusable_settings_are_one_line_naming_each_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCKFLOW_BATCH_SIZE", "0")
    monkeypatch.setenv("STOCKFLOW_COMMANDS_TOPIC", "")
    monkeypatch.setenv("STOCKFLOW_MONGODB_SOCKET_TIMEOUT_MS", "soon")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert "STOCKFLOW_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')" in message
    assert "STOCKFLOW_MONGODB_SOCKET_TIMEOUT_MS" in message and "'soon'" in message


def test_the_session_timeout_reaches_both_stages_above_the_brokers_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """How long a frozen worker keeps its partitions (docs/scaling.md, "A paused worker")."""
    assert (
        kafka_clients.loop_consumer(Settings(), group_id="g", client_id="c")["session.timeout.ms"]
        == 10_000
    )
    monkeypatch.setenv("STOCKFLOW_SESSION_TIMEOUT_MS", "6000")
    config = kafka_clients.loop_consumer(load_settings(), group_id="g", client_id="c")
    assert config["session.timeout.ms"] == 6000
    assert 3 * config["heartbeat.interval.ms"] <= 6000  # a few heartbeats per session
    monkeypatch.setenv("STOCKFLOW_SESSION_TIMEOUT_MS", "3000")  # the broker would refuse it
    with pytest.raises(ConfigError, match="STOCKFLOW_SESSION_TIMEOUT_MS"):
        load_settings()
