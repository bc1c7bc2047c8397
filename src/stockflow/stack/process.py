"""Starting, finding and stopping the background processes of the local stack.

Each service's process is started in a session of its own (so a Ctrl-C in the terminal that ran
``stack up`` does not reach it) and recorded in a pid file with the kernel's start time of the
process (``/proc/<pid>/stat``). A pid file is trusted only while the process it names is alive,
started at the recorded moment and runs the recorded program, so a recycled pid -- even one
now running the same program -- is never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stockflow.errors import ServiceStartError


@dataclass(frozen=True)
class PidRecord:
    """What a pid file says: the pid, the program it ran and when it started."""

    pid: int
    argv0: str
    started_at: float
    start_ticks: int | None = None
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat``, field 22):
    unique to one process for the machine's uptime. None in pid files of older versions."""


_children: dict[int, subprocess.Popen[bytes]] = {}
"""Processes this Python process started: kept so they are reaped, not garbage-collected."""


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3 and on of ``/proc/<pid>/stat`` (after the parenthesised command name)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _proc_state(pid: int) -> str | None:
    fields = _proc_stat_fields(pid)
    return fields[0] if fields else None


def proc_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None when there is no such process."""
    fields = _proc_stat_fields(pid)
    return int(fields[22 - 3]) if fields else None


def _proc_argv0(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, parents before their children (a snapshot)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    state = _proc_state(pid)
    return state is not None and state not in {"Z", "X"}


def read_pidfile(path: Path) -> PidRecord | None:
    """The live process a pid file names, or None when it is missing, stale or recycled."""
    try:
        data = json.loads(path.read_text())
        ticks = data.get("start_ticks")
        record = PidRecord(
            int(data["pid"]),
            str(data["argv0"]),
            float(data["started_at"]),
            None if ticks is None else int(ticks),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not is_alive(record.pid):
        return None
    if record.start_ticks is not None and proc_start_ticks(record.pid) != record.start_ticks:
        return None  # the pid was recycled: another process, whatever program it runs
    argv0 = _proc_argv0(record.pid)
    if argv0 == "":
        return record  # between fork and exec: the command line is not readable yet
    # Some servers rewrite their title ("redis-server 127.0.0.1:6379"): compare the program only.
    if argv0 is None or Path(argv0.split()[0]).name != Path(record.argv0).name:
        return None
    return record


def spawn(
    argv: Sequence[str],
    *,
    pidfile: Path,
    logfile: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> PidRecord:
    """Start ``argv`` detached, its output appended to ``logfile``, and record it in ``pidfile``."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as log:
        log.write(f"\n--- started by stockflow at {time.ctime()}: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    # The start time is set at fork and kept across exec, and the child cannot be reaped
    # before we read it (we hold it in _children), so this is the child's own.
    record = PidRecord(proc.pid, argv[0], time.time(), proc_start_ticks(proc.pid))
    tmp = pidfile.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.__dict__))
    tmp.replace(pidfile)
    return record


def terminate(pid: int, *, timeout: float = 20.0, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``sig`` to the process group of ``pid``, then SIGKILL it after ``timeout`` seconds.

    Returns True when it had to be killed.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return False
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for _ in range(50):
        if not is_alive(pid):
            break
        time.sleep(0.1)
    return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(content[-lines:])


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    pid: int | None = None,
    logfile: Path | None = None,
    interval: float = 0.25,
) -> None:
    """Poll ``ready`` until it is true; fail early and show the log if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if pid is not None and not is_alive(pid):
            log = f"\n--- last lines of {logfile} ---\n{tail(logfile)}" if logfile else ""
            raise ServiceStartError(f"{what} exited during start-up{log}")
        if time.monotonic() > deadline:
            log = f"\n--- last lines of {logfile} ---\n{tail(logfile)}" if logfile else ""
            raise ServiceStartError(f"{what} did not answer within {timeout:.0f}s{log}")
        time.sleep(interval)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so two ``stack up`` calls do not race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
