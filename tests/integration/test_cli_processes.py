"""The command line as an operator runs it: no secret shown, no orphan left, clear exits.

Processes are real (``python -m stockflow``); the services are unreachable addresses, or the
real stack where the worker must actually run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import psutil
import pytest

from stockflow.config import Settings
from stockflow.errors import EXIT_CONFIG, EXIT_TEMPFAIL
from stockflow.pipeline import Pipeline

SECRETS = ("KafkaPw1x", "MongoPw1x", "RedisPw1x")
UNREACHABLE = {
    "KAFKA_BOOTSTRAP_SERVERS": "SASL_SSL://app:KafkaPw1x@127.0.0.1:9",
    "MONGODB_URI": "mongodb://app:MongoPw1x@127.0.0.1:9,127.0.0.1:10/"
    "?replicaSet=rs0&serverSelectionTimeoutMS=500&authSource=admin",
    "REDIS_URL": "redis://:RedisPw1x@127.0.0.1:9/0",
    "STOCKFLOW_KAFKA_TIMEOUT_SECONDS": "2",
}


def stockflow(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockflow", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_no_secret(output: str) -> None:
    for secret in SECRETS:
        assert secret not in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize(
    "command",
    [
        ["stack", "status"],
        ["consume", "--no-supervise"],
        ["-v", "consume", "--no-supervise"],
        ["products", "list"],
        ["topics", "list"],
    ],
    ids=" ".join,
)
def test_no_password_in_any_output(command: list[str]) -> None:
    result = stockflow(*command, env=UNREACHABLE)
    assert result.returncode != 0
    assert_no_secret(result.stdout + result.stderr)
    assert "***" in result.stdout + result.stderr


def test_a_failing_supervised_worker_shows_no_password_either() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume"],
        env={**os.environ, **UNREACHABLE},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # the worker fails (exit 75) and is restarted at least once
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert "restarting in" in err
    assert_no_secret(out + err)


def test_a_configuration_error_exits_78_with_one_line_and_no_restart() -> None:
    result = stockflow("consume", env={"STOCKFLOW_BATCH_SIZE": "0"}, timeout=30)
    assert result.returncode == EXIT_CONFIG
    assert "STOCKFLOW_BATCH_SIZE" in result.stderr and "restarting" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_that_cannot_reach_kafka_exits_75_to_be_restarted(
    worker_env: dict[str, str],
) -> None:
    """Kafka away at start is transient (restart later), not the worker's verdict (1)."""
    away = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "STOCKFLOW_KAFKA_TIMEOUT_SECONDS": "2"}
    result = stockflow("consume", "--no-supervise", env={**worker_env, **away})
    assert result.returncode == EXIT_TEMPFAIL, result.stderr
    assert "cannot reach Kafka at 127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_mongodb_user_exits_78_with_one_line_and_no_restart(
    settings: Settings, worker_env: dict[str, str]
) -> None:
    """Credentials the database refuses are a configuration error, not an outage: the
    supervised worker gives up at once (before: exit 75 and restarts forever)."""
    address = urlsplit(settings.mongodb_url).netloc.rpartition("@")[2]
    uri = f"mongodb://nobody:MongoPw1x@{address}/?authMechanism=PLAIN"
    result = stockflow("consume", env={**worker_env, "MONGODB_URI": uri}, timeout=60)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "refused stockflow's credentials" in result.stderr
    assert "restarting in" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert_no_secret(result.stdout + result.stderr)


def test_the_supervisor_gives_up_on_a_worker_with_a_configuration_error() -> None:
    """The child's own verdict (78) stops the supervisor at once."""
    from stockflow.supervisor import supervise

    said: list[str] = []
    began = time.monotonic()
    worker = [sys.executable, "-c", f"import sys; sys.exit({EXIT_CONFIG})"]
    status = supervise([], say=said.append, command=worker)
    assert status == EXIT_CONFIG and time.monotonic() - began < 20
    assert len(said) == 1 and "configuration error" in said[0]


def test_the_supervisor_restarts_a_worker_that_stopped_for_a_transient_cause(
    tmp_path: object,
) -> None:
    from pathlib import Path

    from stockflow.supervisor import supervise

    runs = Path(str(tmp_path)) / "runs"
    # Exits 75 twice, then 0: the supervisor restarts it with backoff until it is done.
    script = (
        "import sys, pathlib; p = pathlib.Path(sys.argv[-1]); "
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        f"sys.exit({EXIT_TEMPFAIL} if n < 2 else 0)"
    )
    said: list[str] = []
    status = supervise([str(runs)], say=said.append, command=[sys.executable, "-c", script])
    assert status == 0
    assert runs.read_text() == "xxx"
    assert len(said) == 2 and all("restarting in" in line for line in said)


@pytest.fixture
def worker_env(settings: Settings) -> Iterator[dict[str, str]]:
    yield {
        "STOCKFLOW_TOPIC": settings.topic,
        "STOCKFLOW_DATABASE": settings.database,
        "STOCKFLOW_CACHE_KEY_PREFIX": settings.cache_key_prefix,
        "STOCKFLOW_GROUP_ID": settings.group_id,
    }


def _worker_child(supervisor: psutil.Process, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = supervisor.children()
        if children:
            return children[0]
        time.sleep(0.1)
    raise AssertionError("the supervisor started no worker")


def test_sigkill_of_the_supervisor_takes_the_worker_with_it(worker_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockflow", "consume", "--quiet"],
        env={**os.environ, **worker_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    child: psutil.Process | None = None
    try:
        child = _worker_child(psutil.Process(proc.pid))
        time.sleep(3)  # let it get going (pipeline open, groups joined)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        assert proc.poll() is None  # the supervisor too: the kill below is what ends them
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _, alive = psutil.wait_procs([child], timeout=15)
        assert not alive, f"worker {child.pid} outlived its supervisor"
    finally:
        if child is not None and child.is_running():
            child.kill()
        proc.kill()
        proc.wait(10)


def test_global_options_reach_the_worker(worker_env: dict[str, str]) -> None:
    """-v and --timestamps given to the supervisor apply in the worker child."""
    result = stockflow(
        "-v", "--timestamps", "consume", "--idle-timeout", "3", env=worker_env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # Debug lines of the worker (the loop's assignment), with the time and logger name.
    debug = [line for line in result.stdout.splitlines() if " DEBUG stockflow." in line]
    assert debug, result.stdout
    assert debug[0][:4].isdigit()


STORY = """\
Seeded 5 demo products; product 101 has stock 100
Sending order {"orderId":1,"productId":101,"quantity":1}
Processing order for product 101, quantity: 1
Product stock updated for product 101, new stock: 99
Sending order {"orderId":3,"productId":101,"quantity":3}
Processing order for product 101, quantity: 3
Product stock updated for product 101, new stock: 96
Sending order {"orderId":4,"productId":101,"quantity":1000}
Processing order for product 101, quantity: 1000
Insufficient stock for product 101: ordered 1000, in stock 96 (order 4 not applied)
Final stock of product 101: 96 (100 -> 99 -> 96 -> 96)
"""
"""README's `make demo` output after the stack's lines."""


def test_demo_prints_the_story_and_nothing_else(worker_env: dict[str, str]) -> None:
    result = stockflow("demo", "--no-stack", env=worker_env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("Created topic")]
    assert lines == STORY.splitlines(), result.stdout
    assert result.stderr == "", result.stderr  # no librdkafka (%N|...) or pymongo lines


def test_consume_max_messages_is_a_bounded_run(
    settings: Settings, pipeline: Pipeline, worker_env: dict[str, str]
) -> None:
    """``consume --max-messages N`` returns by itself once N orders were handled; the rest
    stays for the next run (nothing lost)."""
    pipeline.inventory.seed({101: 100})
    orders = "".join(f'{{"orderId": {i}, "productId": 101, "quantity": 1}}\n' for i in range(1, 7))
    produced = subprocess.run(
        [sys.executable, "-m", "stockflow", "produce", "--file", "-"],
        input=orders,
        env={**os.environ, **worker_env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert produced.returncode == 0, produced.stderr
    bounded = stockflow("consume", "--max-messages", "3", env=worker_env, timeout=90)
    assert bounded.returncode == 0, bounded.stderr
    first = bounded.stdout.count("Processing order")
    assert first >= 3
    rest = stockflow("consume", "--idle-timeout", "3", env=worker_env, timeout=90)
    assert rest.returncode == 0, rest.stderr
    assert first + rest.stdout.count("Processing order") == 6
    assert pipeline.inventory.stock_of(101) == 94
