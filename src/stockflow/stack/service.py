"""What every service of the local stack has in common: provision, start, probe, stop.

A service is either *local* (stockflow provisions, starts and stops it, and keeps its data,
pid file and log under ``state_dir/<name>/``) or *external* (the user named its address; it is
probed for status and never started or stopped).
"""

from __future__ import annotations

import shutil
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stockflow.config import Settings
from stockflow.errors import PortInUseError, ToolMissingError
from stockflow.stack import process

Reporter = Callable[[str], None]
"""Receives one human-readable line about a slow step (downloading, building, starting)."""


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``stockflow stack status``."""

    name: str
    mode: str  # "local" or "external"
    address: str
    running: bool
    version: str | None
    pid: int | None
    logs: tuple[Path, ...]


def require_tool(name: str, hint: str) -> str:
    """The path of program ``name``, or a ToolMissingError that says how to get it."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise ToolMissingError(f"`{name}` is not installed or not on PATH: {hint}")
    return found


class Service(ABC):
    """A server of the local stack."""

    name: str
    """Short name, also the folder under the state directory."""
    external_kind: str | None = None
    """The Settings service key whose address makes this service external, if any."""
    stop_signal: signal.Signals = signal.SIGTERM
    """The signal that shuts the server down cleanly and promptly."""
    dependency: bool = False
    """True when the services after it need it answering before they start."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir: Path = settings.state_dir / self.name
        self.pidfile = self.dir / f"{self.name}.pid"
        self.logfile = self.dir / f"{self.name}.log"

    # --- to implement ---
    @property
    @abstractmethod
    def port(self) -> int:
        """The loopback port the local instance listens on."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where clients reach the service (masked for display)."""

    @abstractmethod
    def provision(self, report: Reporter) -> None:
        """Download or build what the service needs, into the shared cache; a no-op when cached."""

    @abstractmethod
    def prepare(self, report: Reporter) -> None:
        """Write configuration and initialise storage under ``self.dir`` (idempotent)."""

    @abstractmethod
    def argv(self) -> list[str]:
        """The command line that runs the server in the foreground."""

    @abstractmethod
    def probe(self) -> str | None:
        """The server's version when it answers real requests, else None. Never raises."""

    # --- shared behaviour ---
    @property
    def external(self) -> bool:
        return self.external_kind is not None and self.settings.is_external(
            self.external_kind  # type: ignore[arg-type]
        )

    @property
    def port_variable(self) -> str:
        """The setting that moves this service's port."""
        return f"STOCKFLOW_{self.name.upper()}_PORT"

    def log_paths(self) -> tuple[Path, ...]:
        return (self.logfile,)

    def running_pid(self) -> int | None:
        record = process.read_pidfile(self.pidfile)
        return record.pid if record else None

    def start(self, report: Reporter) -> tuple[str, int | None]:
        """Start the local service unless it already runs. Returns (what happened, pid)."""
        if self.external:
            return "external, not managed", None
        pid = self.running_pid()
        if pid is not None:
            return "already running", pid
        if process.port_open("127.0.0.1", self.port):
            raise PortInUseError(
                f"{self.name}: port {self.port} is in use by a process stockflow did not start; "
                f"stop it, or choose another port ({self.port_variable})"
            )
        self.provision(report)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prepare(report)
        report(f"{self.name}: starting on 127.0.0.1:{self.port}")
        record = process.spawn(
            self.argv(), pidfile=self.pidfile, logfile=self.logfile, cwd=self.dir, env=self.env()
        )
        return "started", record.pid

    def env(self) -> dict[str, str]:
        """Extra environment of the server process."""
        return {}

    def wait_ready(self, pid: int | None) -> str:
        """Block until the service answers; returns its version."""
        version: list[str] = []

        def ready() -> bool:
            found = self.probe()
            if found:
                version.append(found)
            return bool(found)

        process.wait_until(
            ready,
            what=f"{self.name} ({self.address})",
            timeout=self.settings.stack_start_timeout_seconds,
            pid=pid,
            logfile=None if self.external else self.logfile,
        )
        return version[0]

    def stop(self) -> str:
        """Stop the local service if stockflow started it; never touches anything else."""
        if self.external:
            return "external, left alone"
        pid = self.running_pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return "not running"
        killed = process.terminate(pid, sig=self.stop_signal)
        self.pidfile.unlink(missing_ok=True)
        return "killed (did not stop on SIGTERM)" if killed else "stopped"

    def status(self) -> ServiceStatus:
        pid = None if self.external else self.running_pid()
        version = self.probe() if (self.external or pid is not None) else None
        return ServiceStatus(
            name=self.name,
            mode="external" if self.external else "local",
            address=self.address,
            running=version is not None,
            version=version,
            pid=pid,
            logs=() if self.external else self.log_paths(),
        )
