"""FerretDB v1, a MongoDB wire-protocol server, built from the Go module proxy.

The upstream ``cmd/ferretdb`` cannot simply be ``go install``-ed (its version file is generated
at release time), so stockflow builds a few lines of its own around FerretDB's embeddable
package (``assets/ferretdb/main.go``) into ``<cache>/ferretdb-<version>/ferretdb``.
Storage is SQLite under the state folder, or the local PostgreSQL (see ``postgres.py``).

The build carries a few small patches (``ferretdb_patches.py``, applied to a copy of the
module's source and wired in with a ``replace`` directive); each says there why it is safe.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

from stockflow.config import Settings
from stockflow.errors import ProvisionError
from stockflow.stack import process
from stockflow.stack.ferretdb_patches import BUILD, Build, apply_patches
from stockflow.stack.service import Reporter, Service, require_tool

MODULE = "github.com/FerretDB/FerretDB"


@cache
def _binary_version(binary: str) -> str:
    """``FerretDB v1.24.2, build stockflow4``: the version and patch level of a built binary."""
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "FerretDB (unknown version)"
    version = result.stdout.replace(" (embedded)", "").strip() or "FerretDB (unknown version)"
    build = Path(binary).parent.name.rpartition("-")[2]
    return f"{version}, build {build}" if build.startswith("stockflow") else version


PROBE_TIMEOUT_MS = 3000
PROBE_DATABASE = "stockflow_stack"
"""The local FerretDB's probe writes one document here."""


class FerretDBService(Service):
    """FerretDB serving the MongoDB wire protocol on loopback."""

    name = "ferretdb"
    external_kind = "mongodb"

    def __init__(self, settings: Settings, build: Build = BUILD) -> None:
        super().__init__(settings)
        self.build = build

    @property
    def port(self) -> int:
        return self.settings.ferretdb_port

    @property
    def address(self) -> str:
        return self.settings.addresses()["mongodb"]

    @property
    def binary(self) -> Path:
        version = self.settings.ferretdb_version
        return self.settings.cache_dir / f"ferretdb-{version}-{self.build.tag}" / "ferretdb"

    @property
    def data_dir(self) -> Path:
        return self.dir / "sqlite"

    def running_build(self) -> str | None:
        """The build folder (``ferretdb-<version>-<tag>``) of the FerretDB that runs, if any."""
        record = process.read_pidfile(self.pidfile)
        return None if record is None else Path(record.argv0).parent.name

    def start(self, report: Reporter) -> tuple[str, int | None]:
        """Start FerretDB; one that runs another build than :attr:`binary` is restarted.

        A FerretDB left running across an upgrade would otherwise keep serving the older
        patch level (say, one that deadlocks) while ``stack up`` reports it as running.
        Clients see a short outage, as when FerretDB is stopped and started by hand.
        """
        running = None if self.external else self.running_build()
        wanted = self.binary.parent.name
        if running is None or running == wanted:
            return super().start(report)
        self.provision(report)  # built before the old one stops: a failed build stops nothing
        report(f"ferretdb: {running} runs, not the configured {wanted}: restarting it")
        self.stop()
        _, pid = super().start(report)
        return f"restarted (was {running})", pid

    def provision(self, report: Reporter) -> None:
        if self.binary.exists():
            return
        go = require_tool("go", "install Go 1.24 or newer")
        version = self.settings.ferretdb_version
        report(f"ferretdb: building FerretDB {version} from the Go module proxy (first run only)")
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        assets = resources.files("stockflow.stack").joinpath("assets", "ferretdb")
        env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
        with tempfile.TemporaryDirectory(dir=self.binary.parent, prefix="build-") as tmp:
            work = Path(tmp)
            for name in ("main.go", "go.mod", "go.sum"):
                (work / name).write_text(assets.joinpath(name).read_text())
            if f"{MODULE} {version}" not in (work / "go.mod").read_text():
                self._go([go, "get", f"{MODULE}@{version}"], work, env)
            download = self._go([go, "mod", "download", "-json", f"{MODULE}@{version}"], work, env)
            source = work / "ferretdb-src"
            shutil.copytree(json.loads(download)["Dir"], source)
            for path in [source, *source.rglob("*")]:
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
            apply_patches(source, self.build.patches)
            with (work / "go.mod").open("a") as gomod:
                gomod.write(f"\nreplace {MODULE} => ./ferretdb-src\n")
            self._go([go, "build", "-trimpath", "-o", str(work / "ferretdb"), "."], work, env)
            shutil.move(str(work / "ferretdb"), self.binary)

    @staticmethod
    def _go(step: list[str], cwd: Path, env: dict[str, str]) -> str:
        result = subprocess.run(step, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ProvisionError(
                f"ferretdb: `{' '.join(step[1:])}` failed:\n{result.stderr[-3000:]}"
            )
        return result.stdout

    def prepare(self, report: Reporter) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            f"--listen-addr=127.0.0.1:{self.port}",
            f"--handler={self.settings.ferretdb_backend}",
        ]
        if self.settings.ferretdb_backend == "sqlite":
            argv.append(f"--sqlite-url=file:{self.data_dir}/")
        else:
            argv.append(f"--postgresql-url={self.postgresql_url()}")
        return argv

    def env(self) -> dict[str, str]:
        if self.settings.ferretdb_backend != "postgresql":
            return {}
        from stockflow.stack.postgres import read_password

        # FerretDB's PostgreSQL driver (pgx) reads the password from PGPASSWORD: so it is on no
        # command line (which every user of the machine can read) and in no log line.
        password = read_password(self.settings.state_dir / "postgres" / "password")
        return {"PGPASSWORD": password} if password else {}

    def postgresql_url(self) -> str:
        # Stock FerretDB v1 holds one pooled connection per statement of a write command until
        # the command ends and deadlocks when the pool runs dry (fixed in this build by
        # POOL_PATCHES, so the pool size only bounds concurrency now); its default pool is 50.
        port, pool = self.settings.postgres_port, self.settings.ferretdb_pool_max_conns
        return f"postgres://postgres@127.0.0.1:{port}/ferretdb?pool_max_conns={pool}"

    def probe(self) -> str | None:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        # Every call bounded (timeoutMS covers selection, connection and each reply): a server
        # that accepts connections and never answers makes status say so within seconds.
        client: MongoClient[dict[str, object]] = MongoClient(
            self.settings.mongodb_url,
            serverSelectionTimeoutMS=PROBE_TIMEOUT_MS,
            connectTimeoutMS=PROBE_TIMEOUT_MS,
            socketTimeoutMS=PROBE_TIMEOUT_MS,
            timeoutMS=PROBE_TIMEOUT_MS,
        )
        try:
            info = client.admin.command("buildInfo")
            if not self.external:
                # FerretDB answers buildInfo (and reads of what it has cached) without its
                # storage: a write shows whether the PostgreSQL behind it answers too.
                client[PROBE_DATABASE]["probe"].update_one(
                    {"_id": "probe"}, {"$inc": {"n": 1}}, upsert=True
                )
        except PyMongoError:
            return None
        finally:
            client.close()
        wire = f"MongoDB {info.get('version', '?')} wire"
        if "ferretdbVersion" not in info:
            return f"MongoDB {info.get('version', '?')}"
        if self.external:
            return f"FerretDB {info['ferretdbVersion']} ({wire})"
        backend = self.settings.ferretdb_backend
        # The binary that runs, which may be an older build than the one this code would start.
        record = process.read_pidfile(self.pidfile)
        binary = record.argv0 if record is not None else str(self.binary)
        return f"{_binary_version(binary)} ({wire}, {backend})"
