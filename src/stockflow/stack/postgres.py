"""A private PostgreSQL cluster for FerretDB's ``postgresql`` backend (Debian's server binaries).

PostgreSQL refuses to run as root, so when stockflow runs as root the cluster is initialised
and run as the ``postgres`` system user (``runuser``), with its data under the state folder.
Authentication is ``trust`` on loopback only: the cluster holds nothing but FerretDB's data.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from stockflow.errors import ProvisionError
from stockflow.stack import process
from stockflow.stack.service import Reporter, Service, require_tool

DATABASE = "ferretdb"
HINT = "install Debian's postgresql, or use STOCKFLOW_FERRETDB_BACKEND=sqlite"


def _reachable_by_others(path: Path) -> bool:
    """True when every existing folder from / down to ``path`` lets other users pass."""
    for folder in [*reversed(path.parents), path]:
        try:
            mode = folder.stat().st_mode
        except FileNotFoundError:
            return True  # created below by us, with a passable mode
        if not mode & stat.S_IXOTH:
            return False
    return True


def _bin_dir() -> Path:
    """Debian's versioned server folder (newest first), else wherever ``postgres`` is on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    return Path(require_tool("postgres", HINT)).parent


class PostgresService(Service):
    """PostgreSQL on loopback, used only as FerretDB's storage."""

    name = "postgres"
    external_kind = "mongodb"  # a user's MongoDB makes FerretDB, and so this, unnecessary
    dependency = True
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave

    @property
    def port(self) -> int:
        return self.settings.postgres_port

    @property
    def address(self) -> str:
        return f"postgres://127.0.0.1:{self.port}/{DATABASE}"

    @property
    def data_dir(self) -> Path:
        """``state_dir/postgres/data``, unless the server's user cannot reach it (see below)."""
        if os.geteuid() == 0 and not _reachable_by_others(self.dir):
            # Running as root in a private folder (mode 700 somewhere above): the postgres
            # user could not open its own data, so keep it in a folder of its own instead.
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            return Path("/var/tmp") / f"stockflow-postgres-{digest}"
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-run"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        runuser = require_tool("runuser", "install util-linux")
        return [runuser, "-u", "postgres", "--", *argv]

    def provision(self, report: Reporter) -> None:
        _bin_dir()

    def prepare(self, report: Reporter) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        report("postgres: initialising a private cluster (first start only)")
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for path in (self.data_dir, self.socket_dir):
                shutil.chown(path, "postgres", "postgres")
        cmd = self._as_owner(
            [
                str(_bin_dir() / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProvisionError(f"postgres: initdb failed:\n{result.stderr[-3000:]}")

    def argv(self) -> list[str]:
        return self._as_owner(
            [
                str(_bin_dir() / "postgres"),
                "-D", str(self.data_dir),
                "-p", str(self.port),
                "-k", str(self.socket_dir),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "max_connections=200",
                "-c", "shared_buffers=128MB",
                # A standalone mongod acknowledges a write before its journal reaches the disk
                # and flushes the journal every 100 ms; this cluster does the same by default
                # (see the setting's description), instead of one flush per FerretDB update.
                "-c", f"synchronous_commit={self.settings.postgres_synchronous_commit}",
                "-c", "wal_writer_delay=100ms",
            ]
        )  # fmt: skip

    def _psql(self, sql: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(_bin_dir() / "psql"),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-U", "postgres",
            "-d", "postgres",
            "-tAc", sql,
        ]  # fmt: skip
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(cmd, 1, "", str(exc))

    def probe(self) -> str | None:
        if not process.port_open("127.0.0.1", self.port):
            return None
        version = self._psql("SHOW server_version")
        if version.returncode != 0:
            return None
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if exists.stdout.strip() != "1":
            created = self._psql(f"CREATE DATABASE {DATABASE}")
            if created.returncode != 0:
                return None
        return f"PostgreSQL {version.stdout.strip()}"
