"""``stockflow consume`` as a measured child process, and one run of it over a preloaded topic:
the outcomes as a reader sees them, the CPU and memory used, and the audit's verdict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.measure import OutcomeWatch, Sampler, Usage, watch_outcomes
from stockflow.audit import AuditReport, run_audit
from stockflow.config import Settings
from stockflow.pipeline import open_pipeline
from stockflow.worker import ensure_topics

console = Console(stderr=True)


def worker_env(s: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with ``s``'s pipeline and ``extra`` (e.g. where Kafka is)."""
    return {**os.environ, **(extra or {}), **s.worker_environment()}


class StockflowProcess:
    """``stockflow consume`` with its CPU and memory sampled, its output in ``log``.

    ``workers`` None: one worker in the process itself (``--no-supervise``), as the main
    benchmark runs it, writing ``stats_file`` at exit; N: ``--workers N``, N worker processes
    under the supervisor, as users scale out on one host. ``env`` is added to the children's
    environment; ``servers`` names the services' pids to sample (see :class:`Sampler`).
    """

    def __init__(
        self,
        s: Settings,
        *,
        log: Path,
        stats_file: Path | None = None,
        workers: int | None = None,
        env: Mapping[str, str] | None = None,
        servers: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        ensure_topics(s)  # before the workers race to create them
        self.stats_file = stats_file
        self.log = log
        argv = [sys.executable, "-m", "stockflow", "consume", "--quiet"]
        if workers is None:
            argv.append("--no-supervise")
            argv += ["--stats-file", str(stats_file)] if stats_file is not None else []
        else:
            argv += ["--workers", str(workers)]
        # A file, not a pipe: a pipe nobody reads until the end would fill up (64 KiB of
        # warnings over a long run or from a pool) and block every worker on its next line.
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=worker_env(s, env), stdout=subprocess.DEVNULL, stderr=out
            )
        self.sampler = Sampler(self.proc.pid, servers=servers)

    def failed(self) -> str | None:
        """Why the worker is gone, if it exited (the benchmark then stops waiting for it)."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"stockflow consume exited with status {code}:\n{self._tail()}"

    def _tail(self) -> str:
        return self.log.read_bytes()[-2000:].decode(errors="replace")

    def stop(self) -> tuple[Usage, dict[str, Any]]:
        """Stop it (SIGTERM); its resource usage and the timings it wrote at exit."""
        usage = self.sampler.stop()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            raise RuntimeError(f"stockflow consume failed ({self.log}):\n{self._tail()}")
        stats = {}
        if self.stats_file is not None and self.stats_file.exists():
            stats = json.loads(self.stats_file.read_text())
        return usage, stats


@dataclass
class Consumed:
    """One run of ``stockflow consume`` over a preloaded topic."""

    watch: OutcomeWatch
    usage: Usage
    report: AuditReport
    stats: dict[str, Any] = field(default_factory=dict)
    """What a lone worker wrote at exit (``--stats-file``); empty for a pool."""
    started: float = 0.0
    """When the worker process was started (``time.time()``)."""
    stop_seconds: float = 0.0
    """From SIGTERM until the workers had exited."""
    audit_seconds: float = 0.0

    @property
    def orders_per_s_from_start(self) -> float:
        """Outcomes per second from the worker's start to the last outcome: start-up (process,
        group join, catalogue read) included."""
        span = self.watch.last_arrival - self.started
        return self.watch.count / span if span > 0 else 0.0


def consume_all(
    s: Settings,
    expected: int,
    *,
    progress: Callable[[int], None],
    log: Path,
    stats_file: Path | None = None,
    workers: int | None = None,
    env: Mapping[str, str] | None = None,
    servers: Mapping[str, Sequence[int]] | None = None,
    timeout: float = 1800,
) -> Consumed:
    """Run ``stockflow consume`` on ``s``'s topic until ``expected`` orders have an outcome,
    stop it, then audit the run (a fast wrong answer does not count). The workers' output
    goes to ``log``."""
    started = time.time()
    worker = StockflowProcess(
        s, log=log, stats_file=stats_file, workers=workers, env=env, servers=servers
    )
    try:
        watch = watch_outcomes(
            s, expected, timeout=timeout, on_progress=progress, failed=worker.failed
        )
    finally:
        clock = time.monotonic()
        usage, stats = worker.stop()
        stop_seconds = time.monotonic() - clock
    clock = time.monotonic()
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline)
    audit_seconds = time.monotonic() - clock
    return Consumed(watch, usage, report, stats, started, stop_seconds, audit_seconds)
