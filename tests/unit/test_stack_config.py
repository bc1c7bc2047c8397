"""The stack's generated configuration and process bookkeeping (no services needed)."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stockflow.config import Settings
from stockflow.stack import Stack, process
from stockflow.stack.kafka import KafkaService, kraft_cluster_id


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
