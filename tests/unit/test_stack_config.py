"""The stack's generated configuration and process bookkeeping (no services needed)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stockflow.config import Settings, load_settings
from stockflow.errors import ConfigError, ProvisionError
from stockflow.stack import Stack, process, take_back_own
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.kafka import (
    KafkaService,
    kafka_nodes,
    kraft_cluster_id,
    quorum_leader,
    replication_for,
)
from stockflow.stack.postgres import HBA_CONF, PostgresService, ensure_password, read_password
from stockflow.stack.redis import RedisService


def test_cluster_id_has_kafkas_format() -> None:
    cid = kraft_cluster_id()
    assert len(cid) == 22
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # The storage tool reads "--cluster-id -abc..." as two options: formatting failed.
    dashed = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    plain = uuid.UUID(int=1)
    draws = iter([dashed, dashed, plain])
    monkeypatch.setattr("stockflow.stack.kafka.uuid.uuid4", lambda: next(draws))
    cid = kraft_cluster_id()
    assert not cid.startswith("-")
    assert base64.urlsafe_b64decode(cid + "==") == plain.bytes


def test_server_properties_describe_one_kraft_node(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, kafka_port=41000, kafka_controller_port=41001)
    props = dict(line.split("=", 1) for line in KafkaService(s).server_properties().splitlines())
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:41000,CONTROLLER://127.0.0.1:41001"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:41001"
    assert props["log.dirs"] == str(tmp_path / "kafka" / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    # a killed worker's open transaction is aborted within a second of its timeout
    assert int(props["transaction.abort.timed.out.transaction.cleanup.interval.ms"]) <= 1000


def test_env_lines_export_the_three_addresses(tmp_path: Path) -> None:
    lines = Stack(Settings(state_dir=tmp_path, redis_port=41002)).env_lines()
    assert "export REDIS_URL=redis://127.0.0.1:41002/0" in lines
    assert any(line.startswith("export KAFKA_BOOTSTRAP_SERVERS=") for line in lines)
    assert any(line.startswith("export MONGODB_URI=") for line in lines)


def test_pidfile_tracks_a_live_process_and_forgets_a_dead_one(tmp_path: Path) -> None:
    pidfile = tmp_path / "p.pid"
    record = process.spawn(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        pidfile=pidfile,
        logfile=tmp_path / "p.log",
        cwd=tmp_path,
    )
    found = process.read_pidfile(pidfile)
    assert found is not None and found.pid == record.pid, (
        process._proc_argv0(record.pid),
        process._proc_state(record.pid),
        pidfile.read_text(),
    )
    assert process.terminate(record.pid, timeout=5) is False
    assert process.read_pidfile(pidfile) is None


def test_pidfile_of_a_recycled_pid_is_not_trusted(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])
    try:
        # Until the child has exec'd, its command line is empty and any name is believed.
        cmdline = Path(f"/proc/{other.pid}/cmdline")
        deadline = time.monotonic() + 10
        while not cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        pidfile = tmp_path / "x.pid"
        pidfile.write_text(f'{{"pid": {other.pid}, "argv0": "redis-server", "started_at": 0}}')
        assert process.read_pidfile(pidfile) is None
    finally:
        other.kill()
        other.wait()


def _started(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """A child that has exec'd (before that, its command line is empty)."""
    proc = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while not cmdline.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_a_recycled_pid_running_the_same_program_is_not_signalled(tmp_path: Path) -> None:
    """A pid file names a pid that now belongs to another process of the same program (the
    recorded one ended, the pid was reused): ``stack down`` must leave it alone."""
    other = _started(["sleep", "30"], start_new_session=True)
    try:
        ticks = process.proc_start_ticks(other.pid)
        assert ticks is not None
        service = RedisService(Settings(state_dir=tmp_path))
        service.pidfile.parent.mkdir(parents=True)
        service.pidfile.write_text(
            f'{{"pid": {other.pid}, "argv0": "/usr/bin/sleep", "started_at": 0, '
            f'"start_ticks": {ticks - 1}}}'
        )
        assert process.read_pidfile(service.pidfile) is None
        assert service.stop() == "not running"
        assert other.poll() is None, "stack down signalled a process it did not start"
    finally:
        other.kill()
        other.wait()


def test_pidfile_records_the_start_time_and_an_older_pidfile_still_works(tmp_path: Path) -> None:
    pidfile = tmp_path / "p.pid"
    record = process.spawn(
        ["sleep", "30"], pidfile=pidfile, logfile=tmp_path / "p.log", cwd=tmp_path
    )
    try:
        data = json.loads(pidfile.read_text())
        assert data["start_ticks"] == process.proc_start_ticks(record.pid)
        # A pid file written before start times were recorded: trusted on the program name.
        del data["start_ticks"]
        pidfile.write_text(json.dumps(data))
        found = process.read_pidfile(pidfile)
        assert found is not None and found.pid == record.pid
    finally:
        process.terminate(record.pid, timeout=5)


def test_wait_until_reports_a_process_that_died(tmp_path: Path) -> None:
    log = tmp_path / "dead.log"
    record = process.spawn(
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        pidfile=tmp_path / "d.pid",
        logfile=log,
        cwd=tmp_path,
    )
    time.sleep(0.5)
    try:
        process.wait_until(lambda: False, what="dead", timeout=5, pid=record.pid, logfile=log)
    except Exception as exc:
        assert "exited during start-up" in str(exc) and "boom" in str(exc)
    else:
        raise AssertionError("wait_until did not notice the dead process")


def test_broker_version_is_found_after_the_log_rolled(tmp_path: Path) -> None:
    kafka = KafkaService(Settings(state_dir=tmp_path))
    logs = kafka.dir / "logs"
    logs.mkdir(parents=True)
    assert kafka._broker_version() == kafka.settings.kafka_version  # no log yet: the jars'
    (logs / "server.log.2").write_text("INFO Kafka version: 4.0.0 (old start)\n")
    (logs / "server.log.1").write_text("INFO Kafka version: 4.3.1 (last start)\nINFO more\n")
    (logs / "server.log").write_text("INFO only later lines\n")
    assert kafka._broker_version() == "4.3.1"
    (logs / "server.log").write_text("INFO Kafka version: 9.9.9\n")  # restarted since
    assert kafka._broker_version() == "9.9.9"


def test_the_postgres_password_is_random_owner_only_and_kept(tmp_path: Path) -> None:
    first = ensure_password(tmp_path / "a" / "password")
    second = ensure_password(tmp_path / "b" / "password")
    assert first != second and len(first) >= 24
    assert stat.S_IMODE((tmp_path / "a" / "password").stat().st_mode) == 0o600
    assert ensure_password(tmp_path / "a" / "password") == first  # kept across starts
    assert read_password(tmp_path / "missing") is None  # an older version's trust cluster


def test_pg_hba_trusts_no_one() -> None:
    methods = {line.split()[-1] for line in HBA_CONF.splitlines() if line and line[0] != "#"}
    assert methods == {"peer", "scram-sha-256"}


def test_ferretdb_gets_the_password_in_its_environment_not_its_command_line(
    tmp_path: Path,
) -> None:
    settings = Settings(state_dir=tmp_path)
    password = ensure_password(tmp_path / "postgres" / "password")
    ferretdb = FerretDBService(settings)
    assert ferretdb.env() == {"PGPASSWORD": password}
    assert not any(password in arg for arg in ferretdb.argv())
    assert password not in PostgresService(settings).address
    assert FerretDBService(Settings(state_dir=tmp_path, ferretdb_backend="sqlite")).env() == {}


def test_addresses_of_the_local_stack_are_taken_back_only_while_it_runs(tmp_path: Path) -> None:
    """``eval "$(stockflow stack env)"`` exports the local stack's own addresses: the chaos
    harness may break those services, but never a look-alike address or a stopped stack."""
    base = Settings(state_dir=tmp_path, redis_port=41003)
    exported = {
        "KAFKA_BOOTSTRAP_SERVERS": base.kafka_bootstrap,
        "MONGODB_URI": base.mongodb_url,
        "REDIS_URL": "redis://127.0.0.1:41003/0",
    }
    settings = Settings(state_dir=tmp_path, redis_port=41003, **exported)  # type: ignore[arg-type]
    _, foreign = take_back_own(settings)
    assert len(foreign) == 3 and all("no live pid file" in line for line in foreign)

    redis = RedisService(base)
    record = process.spawn(
        ["sleep", "30"], pidfile=redis.pidfile, logfile=redis.logfile, cwd=tmp_path
    )
    try:
        taken, foreign = take_back_own(settings)
        assert not taken.is_external("redis") and taken.redis_dsn == exported["REDIS_URL"]
        assert taken.is_external("kafka") and len(foreign) == 2
        other = Settings(state_dir=tmp_path, redis_port=41003, redis_url="redis://h:41003/0")
        _, foreign = take_back_own(other)
        assert foreign == [
            f"REDIS_URL=redis://h:41003/0 is not this local stack's address "
            f"(redis://127.0.0.1:41003/0, state folder {tmp_path})"
        ]
    finally:
        process.terminate(record.pid, timeout=5)


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_one_broker_keeps_todays_folder_ports_and_properties(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, kafka_port=41000, kafka_controller_port=41001)
    (node,) = kafka_nodes(s)
    assert (node.name, node.dir, node.port, node.controller_port) == (
        "kafka",
        tmp_path / "kafka",
        41000,
        41001,
    )
    props = _props(node.server_properties())
    assert "controller.quorum.voters" not in props
    assert props["transaction.state.log.min.isr"] == "1"
    assert "default.replication.factor" not in props
    assert s.kafka_bootstrap == "127.0.0.1:41000"


def test_three_brokers_are_a_kraft_cluster_with_offset_ports_and_own_folders(
    tmp_path: Path,
) -> None:
    s = Settings(state_dir=tmp_path, kafka_port=41000, kafka_controller_port=41001, kafka_brokers=3)
    nodes = kafka_nodes(s)
    assert [(n.name, n.node_id, n.port, n.controller_port) for n in nodes] == [
        ("kafka-1", 1, 41000, 41001),
        ("kafka-2", 2, 41002, 41003),
        ("kafka-3", 3, 41004, 41005),
    ]
    assert s.kafka_bootstrap == "127.0.0.1:41000,127.0.0.1:41002,127.0.0.1:41004"
    voters = "1@127.0.0.1:41001,2@127.0.0.1:41003,3@127.0.0.1:41005"
    for node in nodes:
        props = _props(node.server_properties())
        assert props["node.id"] == str(node.node_id)
        assert props["controller.quorum.voters"] == voters
        assert "controller.quorum.bootstrap.servers" not in props
        assert props["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
        )
        assert props["log.dirs"] == str(tmp_path / node.name / "data")
        for topic in ("offsets.topic", "transaction.state.log", "share.coordinator.state.topic"):
            assert props[f"{topic}.replication.factor"] == "3"
        assert props["transaction.state.log.min.isr"] == "2"
        assert props["share.coordinator.state.topic.min.isr"] == "2"
    services = Stack(s.model_copy(update={"redis_url": None})).services
    assert [svc.name for svc in services if svc.name.startswith("kafka")] == [
        "kafka-1", "kafka-2", "kafka-3"
    ]  # fmt: skip


def test_replication_is_three_copies_at_most_and_two_in_sync_of_three() -> None:
    assert [replication_for(n) for n in (1, 2, 3, 5)] == [(1, 1), (2, 1), (3, 2), (3, 2)]


def test_cluster_ports_that_collide_are_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distinct ports") as caught:
        load_settings(
            state_dir=tmp_path, kafka_port=41000, kafka_controller_port=41002, kafka_brokers=3
        )
    assert "\n" not in str(caught.value)


def test_quorum_leader_is_the_newest_epoch_any_node_recorded(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, kafka_brokers=3)
    nodes = kafka_nodes(s)
    assert quorum_leader(nodes) is None
    for node, (leader, epoch) in zip(nodes, [(1, 4), (2, 5), (-1, 6)], strict=True):
        folder = node.data_dir / "__cluster_metadata-0"
        folder.mkdir(parents=True)
        state = {"leaderId": leader, "leaderEpoch": epoch, "votedId": -1}
        (folder / "quorum-state").write_text(json.dumps(state))
    assert quorum_leader(nodes) == (2, 5)


def test_process_tree_finds_grandchildren_and_hung_stops_and_continues_them() -> None:
    """What the outage tests and chaos scenarios rely on to hang a server: every process below
    it (PostgreSQL's backends lead process groups of their own), stopped for the block and
    running again afterwards, even when the block raises."""
    from stockflow.testing import hung

    # root -> sh (a session of its own, as PostgreSQL's backends are) -> sleep
    code = (
        "import subprocess, time;"
        "subprocess.Popen(['sh', '-c', 'sleep 30; true'], start_new_session=True);"
        "time.sleep(30)"
    )
    root = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while len(process.process_tree(root.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process.process_tree(root.pid)
        assert tree[0] == root.pid and len(tree) == 3, tree

        def all_in(state: str) -> bool:
            deadline = time.monotonic() + 5  # a signal is delivered asynchronously
            while time.monotonic() < deadline:
                if all(process._proc_state(pid) == state for pid in tree):
                    return True
                time.sleep(0.02)
            return False

        with pytest.raises(RuntimeError), hung(root.pid) as stopped:
            assert stopped == tree
            assert all_in("T")
            raise RuntimeError("the block failed")
        assert all_in("S")
    finally:
        for pid in process.process_tree(root.pid)[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        root.wait(10)


def test_remove_data_refuses_a_running_cluster_and_deletes_a_private_folder(
    tmp_path: Path,
) -> None:
    """A throw-away cluster's end: data, socket folder and the private folder recorded in
    ``data-location`` are deleted; nothing else is, and a running cluster is refused."""
    service = PostgresService(Settings(state_dir=tmp_path / "state"))
    private = tmp_path / "stockflow-postgres-x1y2"
    (private / "data").mkdir(parents=True)
    (private / "data-run").mkdir()
    neighbour = tmp_path / "keep"
    neighbour.mkdir()
    service.dir.mkdir(parents=True)
    service.location_file.write_text(f"{private}\n")
    process.spawn(["sleep", "30"], pidfile=service.pidfile, logfile=service.logfile, cwd=tmp_path)
    with pytest.raises(ProvisionError):
        service.remove_data()
    assert (private / "data").exists()
    service.stop()
    service.remove_data()
    assert not private.exists() and not service.location_file.exists()
    assert neighbour.exists() and service.dir.exists()
