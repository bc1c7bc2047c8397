"""`stockflow stack` on real processes: idempotent up, versions, env, and a clean down."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from stockflow.config import Settings
from stockflow.stack import Stack
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.ferretdb_patches import BUILD, Build
from stockflow.stack.postgres import PostgresService, _bin_dir, legacy_data_dir
from stockflow.stack.process import is_alive, port_open
from stockflow.stack.redis import RedisService
from stockflow.testing import free_ports, private_database


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


def _psql(service: PostgresService, password: str | None) -> subprocess.CompletedProcess[str]:
    """``SELECT 1`` over TCP as the cluster's superuser, with ``password`` or none at all."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        [str(_bin_dir() / "psql"), "-h", "127.0.0.1", "-p", str(service.port), "-U", "postgres",
         "-d", "postgres", "-w", "-tAc", "SELECT 1"],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip


def _owner_only(path: Path) -> bool:
    info = path.lstat()
    return stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077


def test_a_second_stack_comes_up_and_down_leaves_nothing_running(tmp_path: Path) -> None:
    """A whole separate stack (own ports and state, PostgreSQL behind FerretDB, its state in a
    folder only its owner can enter) from cold start to stop."""
    # Ports the system says are free now: fixed ones can be taken by a client connection's
    # local port (they lie in the ephemeral range), which once failed Kafka's start here.
    ports = free_ports(5)
    settings = Settings(
        state_dir=tmp_path / "state",
        kafka_port=ports[0],
        kafka_controller_port=ports[1],
        ferretdb_port=ports[2],
        redis_port=ports[3],
        postgres_port=ports[4],
    )
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "MONGODB_URI", "REDIS_URL"):
        if os.environ.get(name):
            pytest.skip(f"{name} is set: this test needs every service local")
    tmp_path.chmod(0o700)  # a private folder, as a home directory is
    stack = Stack(settings)
    postgres = PostgresService(settings)
    try:
        results = stack.up()
        assert [r.action for r in results] == ["started"] * 4
        pids = [r.pid for r in results]
        assert all(pid is not None and is_alive(pid) for pid in pids)
        again = stack.up()
        assert [r.action for r in again] == ["already running"] * 4
        assert [r.pid for r in again] == pids
        # FerretDB reaches PostgreSQL with the generated password, which no one else sees.
        password = postgres.password()
        assert password
        client: MongoClient[dict[str, object]] = MongoClient(settings.mongodb_url)
        try:
            client["t"]["c"].insert_one({"_id": 1})
            assert client["t"]["c"].count_documents({}) == 1
        finally:
            client.close()
        for row in stack.status():
            assert password not in row.address
        ferretdb_pid = pids[2]
        assert password not in Path(f"/proc/{ferretdb_pid}/cmdline").read_text()
        for log in (tmp_path / "state").rglob("*.log"):
            assert password not in log.read_text(errors="replace"), log
    finally:
        down = stack.down()
        postgres.remove_data()
    assert {r.action for r in down} == {"stopped"}
    assert not any(is_alive(pid) for pid in pids if pid is not None)
    for port in ports:
        assert not port_open("127.0.0.1", port), f"port {port} still open"
    assert [r.action for r in stack.down()] == ["not running"] * 4


def test_status_of_a_ferretdb_whose_postgresql_hangs_returns_within_seconds(
    tmp_path: Path,
) -> None:
    """A private FerretDB whose PostgreSQL is stopped with SIGSTOP accepts connections and
    answers what needs no storage; status must try a real read and write, bounded, and say the
    service is not answering. Before: 'up' (buildInfo only), and no socket timeout at all."""
    tmp_path.chmod(0o700)
    with private_database(tmp_path / "state") as database:
        ferretdb, settings = database.ferretdb, database.settings
        assert ferretdb.status().running
        with database.hang_postgres():
            started = time.monotonic()
            status = ferretdb.status()
            assert time.monotonic() - started < 10
            assert not status.running and status.pid is not None
            shown = subprocess.run(
                [sys.executable, "-m", "stockflow", "stack", "status"],
                capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, **{f"STOCKFLOW_{k}": str(v) for k, v in (
                    ("STATE_DIR", settings.state_dir), ("FERRETDB_PORT", settings.ferretdb_port),
                    ("POSTGRES_PORT", settings.postgres_port))}},
            )  # fmt: skip
            assert shown.returncode == 1, shown.stderr
            line = next(x for x in shown.stdout.splitlines() if "ferretdb" in x)
            assert "not answering" in line, shown.stdout
        assert ferretdb.status().running


def test_up_restarts_a_ferretdb_that_runs_another_build(tmp_path: Path) -> None:
    """A FerretDB left running from an older patch level (one that deadlocks, say) is replaced
    by the configured build when the stack is brought up; one of the configured build is left
    alone. Before: 'already running', and the older build kept serving."""
    configured = FerretDBService(Settings(state_dir=tmp_path / "probe"))
    configured.provision(lambda _: None)  # built by `stack up` already, normally
    cache = tmp_path / "cache"
    version = configured.settings.ferretdb_version
    for tag in ("stockflow0", BUILD.tag):  # two build folders, the same binary in both
        folder = cache / f"ferretdb-{version}-{tag}"
        folder.mkdir(parents=True)
        (folder / "ferretdb").symlink_to(configured.binary)
    settings = Settings(
        state_dir=tmp_path / "state",
        cache_dir=cache,
        ferretdb_port=free_ports(1)[0],
        ferretdb_backend="sqlite",
    )
    older, ferretdb = FerretDBService(settings, Build("stockflow0", ())), FerretDBService(settings)
    try:
        _, old_pid = older.start(lambda _: None)
        older.wait_ready(old_pid)
        said: list[str] = []

        action, pid = ferretdb.start(said.append)

        assert action == f"restarted (was ferretdb-{version}-stockflow0)"
        assert any("restarting it" in line for line in said), said
        assert old_pid is not None and not is_alive(old_pid)
        assert f"build {BUILD.tag}" in ferretdb.wait_ready(pid)
        assert ferretdb.running_build() == f"ferretdb-{version}-{BUILD.tag}"
        assert ferretdb.start(lambda _: None) == ("already running", pid)
    finally:
        ferretdb.stop()


def test_postgres_has_a_password_and_private_data_and_older_clusters_are_migrated(
    tmp_path: Path,
) -> None:
    """The cluster behind FerretDB: a generated password (mode 600) instead of ``trust``; when
    run as root from a private folder, its data in a folder nobody could have prepared, not in
    a predictable one of the shared temporary folder; an older version's cluster keeps its
    data and gets the password (and leaves the predictable folder) at its next start."""
    tmp_path.chmod(0o700)
    settings = Settings(state_dir=tmp_path / "state", postgres_port=free_ports(1)[0])
    service = PostgresService(settings)
    as_root = os.geteuid() == 0

    def start() -> None:
        _, pid = service.start(lambda _: None)
        service.wait_ready(pid)

    try:
        start()
        password = service.password()
        assert password and len(password) >= 24
        assert stat.S_IMODE(service.password_file.stat().st_mode) == 0o600
        assert _psql(service, None).returncode != 0, "no password needed"
        assert _psql(service, "wrong").returncode != 0, "any password accepted"
        assert _psql(service, password).stdout.strip() == "1"
        hba = (service.data_dir / "pg_hba.conf").read_text()
        assert "trust" not in [line.split()[-1] for line in hba.splitlines() if line.strip()]
        if as_root:
            home = service.data_dir.parent
            shared_tmp = {Path("/tmp"), Path("/var/tmp")}
            assert service.data_dir != legacy_data_dir(service.dir)
            assert home != service.dir and _owner_only(home)
            assert home.stat().st_uid == pwd.getpwnam("postgres").pw_uid
            assert not (
                home.parent in shared_tmp and home.name == legacy_data_dir(service.dir).name
            )
            assert home.name != "stockflow-postgres" and len(home.name) > len("stockflow-postgres-")
        service.stop()

        # An older version's cluster: trust, no password file, data in the predictable folder.
        (service.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        service.password_file.unlink()
        if as_root:
            old_home = service.data_dir.parent
            legacy = legacy_data_dir(service.dir)
            shutil.move(str(service.data_dir), str(legacy))
            service.location_file.unlink()
            shutil.rmtree(old_home)
        start()
        migrated = service.password()
        assert migrated and migrated != password
        assert _psql(service, None).returncode != 0, "still trust after the migration"
        assert _psql(service, migrated).stdout.strip() == "1"
        if as_root:
            assert not legacy.exists()
            assert service.data_dir.parent != legacy.parent and _owner_only(service.data_dir.parent)
            # The private folder deleted by hand: a new one is made, not a traceback.
            service.stop()
            gone = service.data_dir.parent
            shutil.rmtree(gone)
            start()
            assert service.data_dir.parent != gone and _owner_only(service.data_dir.parent)
            assert _psql(service, migrated).stdout.strip() == "1"
    finally:
        service.stop()
        service.remove_data()
        if as_root:
            shutil.rmtree(legacy_data_dir(service.dir), ignore_errors=True)


def test_the_seed_story_runs_on_a_kafka_3_9_stack(tmp_path: Path) -> None:
    """Clients that speak only Kafka's old protocol versions (the seed's kafka-node; Kafka 4
    removed them, KIP-896) need a broker <= 3.9: ``STOCKFLOW_KAFKA_VERSION=3.9.1`` runs one,
    and the seed's story (``stockflow demo``) must hold on it. A private stack of its own
    (ports, state); the first run resolves 3.9.1's jars into the cache."""
    ports = free_ports(5)
    state = tmp_path / "state"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STOCKFLOW_")},
        "STOCKFLOW_STATE_DIR": str(state),
        "STOCKFLOW_KAFKA_VERSION": "3.9.1",
        "STOCKFLOW_KAFKA_PORT": str(ports[0]),
        "STOCKFLOW_KAFKA_CONTROLLER_PORT": str(ports[1]),
        "STOCKFLOW_FERRETDB_PORT": str(ports[2]),
        "STOCKFLOW_REDIS_PORT": str(ports[3]),
        "STOCKFLOW_POSTGRES_PORT": str(ports[4]),
        "COLUMNS": "250",
    }
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "MONGODB_URI", "REDIS_URL"):
        env.pop(name, None)

    def stockflow(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stockflow", *args],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )  # fmt: skip

    postgres = PostgresService(Settings(state_dir=state))
    try:
        demo = stockflow("demo", timeout=600)
        out = demo.stdout + demo.stderr
        assert demo.returncode == 0, out
        assert "Apache Kafka 3.9.1 (KRaft" in out
        # The broker's own word, not the configured version: its log says which one runs.
        assert "Kafka version: 3.9.1" in (state / "kafka" / "logs" / "server.log").read_text()
        assert "Final stock of product 101: 96 (100 -> 99 -> 96 -> 96)" in out
    finally:
        down = stockflow("stack", "down", timeout=120)
        postgres.remove_data()
    assert down.returncode == 0, down.stdout + down.stderr
    for port in ports:
        assert not port_open("127.0.0.1", port), f"port {port} still open"
