"""`stockflow stack` on real processes: idempotent up, versions, env, and a clean down."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stockflow.config import Settings
from stockflow.stack import Stack
from stockflow.stack.process import is_alive, port_open
from stockflow.stack.redis import RedisService


def test_up_twice_leaves_running_services_alone(stack_settings: Settings) -> None:
    stack = Stack(stack_settings)
    before = {s.name: s.running_pid() for s in stack.services}
    results = stack.up()
    local = [r for r in results if r.action != "external, not managed"]
    assert all(r.action == "already running" for r in local)
    assert {r.name: r.pid for r in local} == {n: p for n, p in before.items() if p is not None}


def test_status_shows_each_real_service_with_its_version(stack_settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stockflow", "stack", "status"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {s.name: s for s in Stack(stack_settings).status()}
    assert all(row.running for row in rows.values())
    if not stack_settings.is_external("kafka"):
        assert rows["kafka"].version and "Apache Kafka 4.3.1 (KRaft" in rows["kafka"].version
        assert "Apache Kafka 4.3.1" in result.stdout
    if not stack_settings.is_external("mongodb"):
        assert rows["ferretdb"].version and "FerretDB v1.24.2" in rows["ferretdb"].version
    if not stack_settings.is_external("redis"):
        assert rows["redis"].version and rows["redis"].version.startswith("Redis ")


def test_env_lines_reach_the_same_services(stack_settings: Settings) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    script = 'eval "$(python -m stockflow stack env)"; redis-cli -u "$REDIS_URL" ping'
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.stdout.strip() == "PONG", result.stderr


def test_external_service_is_neither_started_nor_stopped(
    stack_settings: Settings, tmp_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path, redis_url=stack_settings.redis_dsn)
    service = RedisService(settings)
    assert service.start(lambda _: None) == ("external, not managed", None)
    assert service.stop() == "external, left alone"
    assert not (tmp_path / "redis").exists()
    assert service.status().running  # the user's Redis still answers


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on or is bound to at this moment."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_a_second_stack_comes_up_and_down_leaves_nothing_running(tmp_path: Path) -> None:
    """A whole separate stack (own ports and state, the SQLite backend) from cold start to stop."""
    # Ports the system says are free now: fixed ones can be taken by a client connection's
    # local port (they lie in the ephemeral range), which once failed Kafka's start here.
    ports = _free_ports(4)
    settings = Settings(
        state_dir=tmp_path / "state",
        ferretdb_backend="sqlite",  # the suite's own stack runs the default, postgresql
        kafka_port=ports[0],
        kafka_controller_port=ports[1],
        ferretdb_port=ports[2],
        redis_port=ports[3],
    )
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "MONGODB_URI", "REDIS_URL"):
        if os.environ.get(name):
            pytest.skip(f"{name} is set: this test needs every service local")
    stack = Stack(settings)
    try:
        results = stack.up()
        assert [r.action for r in results] == ["started"] * 3
        pids = [r.pid for r in results]
        assert all(pid is not None and is_alive(pid) for pid in pids)
        again = stack.up()
        assert [r.action for r in again] == ["already running"] * 3
        assert [r.pid for r in again] == pids
    finally:
        down = stack.down()
    assert {r.action for r in down} == {"stopped"}
    assert not any(is_alive(pid) for pid in pids if pid is not None)
    for port in ports:
        assert not port_open("127.0.0.1", port), f"port {port} still open"
    assert [r.action for r in stack.down()] == ["not running"] * 3
