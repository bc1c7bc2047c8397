"""A private PostgreSQL cluster for FerretDB's ``postgresql`` backend (Debian's server binaries).

PostgreSQL refuses to run as root, so when stockflow runs as root the cluster is initialised
and run as the ``postgres`` system user (``runuser``).

Its data lives under the state folder (``postgres/data``) when the ``postgres`` user can reach
that folder. When it cannot (root working in a private folder: a mode-700 folder above it), the
data goes to a folder created for this state folder with an unpredictable name
(``mkdtemp``: created exclusively, so nobody can have prepared it) in the ``postgres`` user's
home, owned by ``postgres`` and mode 700; its path is recorded in ``postgres/data-location``.
Older versions used a predictable ``/var/tmp/stockflow-postgres-<hash>`` there: such a cluster
is moved into a private folder at its next start.

Authentication: a password generated at initialisation (``postgres/password``, mode 600) over
TCP, ``peer`` on the Unix socket (whose folder only ``postgres`` can enter). A cluster
initialised by an older version with ``trust`` gets a password and the new ``pg_hba.conf`` at
its next start, unless a FerretDB started without the password still uses it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

from stockflow.errors import ProvisionError
from stockflow.stack import process
from stockflow.stack.service import Reporter, Service, require_tool

DATABASE = "ferretdb"
HINT = "install Debian's postgresql, or use STOCKFLOW_FERRETDB_BACKEND=sqlite"
OWNER = "postgres"
"""The system user that runs the cluster when stockflow runs as root."""

HBA_CONF = """\
# Written by stockflow: the Unix socket (in a folder only the server's user can enter) for
# that user alone, a password over TCP (loopback only: listen_addresses=127.0.0.1).
local   all             all                     peer
host    all             all     127.0.0.1/32    scram-sha-256
host    all             all     ::1/128         scram-sha-256
local   replication     all                     peer
host    replication     all     127.0.0.1/32    scram-sha-256
host    replication     all     ::1/128         scram-sha-256
"""


def read_password(path: Path) -> str | None:
    """The cluster's password, or None for a cluster of an older version (``trust``)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_password(path: Path) -> str:
    """The password stored at ``path`` (mode 600, created with a fresh random one if missing)."""
    found = read_password(path)
    if found is not None:
        path.chmod(0o600)
        return found
    password = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # an empty file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def legacy_data_dir(service_dir: Path) -> Path:
    """Where versions before the private location put the data (predictable: do not reuse)."""
    digest = hashlib.sha256(str(service_dir).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"stockflow-postgres-{digest}"


def private_base(user: str = OWNER) -> Path:
    """Where private data folders are made: ``user``'s home if only that user (and root) can
    write there, else the system's persistent temporary folder (``mkdtemp`` keeps it safe)."""
    try:
        entry = pwd.getpwnam(user)
        home = Path(entry.pw_dir)
        info = home.lstat()
    except (KeyError, OSError):
        return Path("/var/tmp")
    if stat.S_ISDIR(info.st_mode) and info.st_uid == entry.pw_uid and not info.st_mode & 0o022:
        return home
    return Path("/var/tmp")


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
        user = "postgres:***@" if self.password() else ""
        return f"postgres://{user}127.0.0.1:{self.port}/{DATABASE}"

    @property
    def password_file(self) -> Path:
        return self.dir / "password"

    def password(self) -> str | None:
        """The password FerretDB and the probe log in with (None: an older ``trust`` cluster)."""
        return read_password(self.password_file)

    @property
    def location_file(self) -> Path:
        return self.dir / "data-location"

    def _outside_state_dir(self) -> bool:
        """True when the server's user could not open data under the state folder."""
        return os.geteuid() == 0 and not _reachable_by_others(self.dir)

    @property
    def data_dir(self) -> Path:
        """The cluster: ``state_dir/postgres/data``, or in the recorded private folder."""
        try:
            return Path(self.location_file.read_text().strip()) / "data"
        except FileNotFoundError:
            pass
        if self._outside_state_dir():
            return legacy_data_dir(self.dir)  # an older version's: prepare() moves it
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-run"

    def remove_data(self) -> None:
        """Delete a stopped cluster for good: its data and socket folders, and the private
        folder made for them outside the state folder (a throw-away cluster's end: tests,
        benchmarks). A running cluster is refused."""
        if self.running_pid() is not None:
            raise ProvisionError(f"postgres: {self.data_dir} is in use; stop the cluster first")
        private = self.data_dir.parent if self.location_file.exists() else None
        for folder in (self.data_dir, self.socket_dir):
            shutil.rmtree(folder, ignore_errors=True)
        if private is not None and private.name.startswith("stockflow-postgres-"):
            shutil.rmtree(private, ignore_errors=True)
        self.location_file.unlink(missing_ok=True)

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        runuser = require_tool("runuser", "install util-linux")
        return [runuser, "-u", OWNER, "--", *argv]

    def _chown(self, *paths: Path) -> None:
        if os.geteuid() == 0:
            for path in paths:
                shutil.chown(path, OWNER, OWNER)

    def provision(self, report: Reporter) -> None:
        _bin_dir()

    def _place_outside(self, report: Reporter) -> None:
        """Create this state folder's private data folder (and move an older version's in)."""
        if self.location_file.exists():
            recorded = self.data_dir.parent
            if os.path.lexists(recorded):
                self._check_location(recorded)
                return
            report(f"postgres: {recorded} is gone; making a new private folder for the data")
            self.location_file.unlink()
        if not self._outside_state_dir():
            return
        home = Path(tempfile.mkdtemp(prefix="stockflow-postgres-", dir=private_base()))
        self._chown(home)
        legacy = legacy_data_dir(self.dir)
        info = legacy.lstat() if legacy.exists() else None
        if info is not None and stat.S_ISDIR(info.st_mode) and (legacy / "PG_VERSION").exists():
            if info.st_uid != pwd.getpwnam(OWNER).pw_uid:
                raise ProvisionError(
                    f"postgres: {legacy} (an older version's data folder) is not owned by "
                    f"{OWNER}: it may not be ours; remove it, then run `stockflow stack up` again"
                )
            report(f"postgres: moving the cluster out of {legacy} into {home}")
            shutil.move(str(legacy), str(home / "data"))
            shutil.rmtree(f"{legacy}-run", ignore_errors=True)
        tmp = self.location_file.with_suffix(".tmp")
        tmp.write_text(f"{home}\n")
        tmp.replace(self.location_file)

    def _check_location(self, home: Path) -> None:
        info = home.lstat()
        owners = {0, pwd.getpwnam(OWNER).pw_uid}
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners or info.st_mode & 0o077:
            raise ProvisionError(
                f"postgres: {home} (recorded in {self.location_file}) is not a private folder "
                f"of {OWNER}; remove {self.location_file} to have a new one made"
            )

    def prepare(self, report: Reporter) -> None:
        self._place_outside(report)
        if (self.data_dir / "PG_VERSION").exists():
            self._socket_dir()
            if self.password() is None:
                self._migrate_from_trust(report)
            return
        report("postgres: initialising a private cluster (first start only)")
        password = ensure_password(self.password_file)
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._chown(self.data_dir)
        self._socket_dir()
        # initdb reads the password from a file (never a command line) that its user can open:
        # one in the socket folder, which only that user can enter, removed right after.
        pwfile = self.socket_dir / "initdb-password"
        pwfile.unlink(missing_ok=True)
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        self._chown(pwfile)
        cmd = self._as_owner(
            [
                str(_bin_dir() / "initdb"),
                "-D", str(self.data_dir),
                "-U", "postgres",
                "--auth-local=peer",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )  # fmt: skip
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ProvisionError(f"postgres: initdb failed:\n{result.stderr[-3000:]}")
        self._write_hba()

    def _socket_dir(self) -> None:
        """The socket's folder: only the server's user may enter it (``peer`` relies on it)."""
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_dir.chmod(0o700)
        self._chown(self.socket_dir)

    def _write_hba(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(HBA_CONF)
        hba.chmod(0o600)
        self._chown(hba)

    def _migrate_from_trust(self, report: Reporter) -> None:
        """Give a cluster initialised with ``trust`` by an older version a password."""
        from stockflow.stack.ferretdb import FerretDBService

        if FerretDBService(self.settings).running_pid() is not None:
            report("postgres: still without a password (FerretDB runs without one); it gets one "
                   "at the next start after `stockflow stack down`")  # fmt: skip
            return
        report("postgres: this cluster had no password (an older version's); setting one")
        self.password_file.unlink(missing_ok=True)
        password = ensure_password(self.password_file)
        # Single-user mode needs no authentication and no running server; the statement
        # arrives on stdin, so the password is on no command line.
        cmd = self._as_owner([str(_bin_dir() / "postgres"), "--single", "-D", str(self.data_dir)])
        statement = f"ALTER ROLE postgres PASSWORD '{password}';\n"  # token_urlsafe: no quotes
        result = subprocess.run(
            [*cmd, "postgres"], input=statement, capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or "ERROR" in result.stderr:
            self.password_file.unlink(missing_ok=True)
            raise ProvisionError(f"postgres: could not set a password:\n{result.stderr[-3000:]}")
        self._write_hba()

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
        env = {**os.environ, "PGPASSWORD": self.password() or "", "PGCONNECT_TIMEOUT": "5"}
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=10, env=env
            )
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
