"""Measuring: CPU and memory of processes, outcomes as they are published, percentiles."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer

from stockflow.config import Settings
from stockflow.outcomes import decode_event
from stockflow.stack import Stack

SERVERS = {
    "ferretdb": lambda p: "ferretdb" in p.name(),
    "postgres": lambda p: p.name() == "postgres" or p.name().startswith("postgres"),
    "kafka": lambda p: "java" in p.name() and "kafka.Kafka" in " ".join(p.cmdline()),
    "redis": lambda p: "redis-server" in p.name(),
}


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


def server_cpu() -> dict[str, float]:
    """CPU seconds used so far by each local service (all its processes), found by name."""
    totals = dict.fromkeys(SERVERS, 0.0)
    for proc in psutil.process_iter():
        try:
            for name, match in SERVERS.items():
                if match(proc):
                    totals[name] += _cpu(proc)
                    break
        except psutil.Error:
            continue
    return totals


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants so far, those that exited and were reaped
    included (a reaped process's time is in its parent's ``children_*`` times, a live one's
    in its own, never in both): a PostgreSQL's backends that come and go all count."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def servers_cpu(servers: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """CPU seconds used so far by each named server: the process trees of its pids."""
    return {name: sum(_tree_cpu(pid) for pid in pids) for name, pids in servers.items()}


def stack_servers(s: Settings) -> dict[str, list[int]]:
    """The pid of each running service of the local stack, by service name (``kafka``, or
    ``kafka-1`` ... of a cluster); services the user runs elsewhere have none to sample."""
    found: dict[str, list[int]] = {}
    for service in Stack(s).services:
        pid = None if service.external else service.running_pid()
        if pid is not None:
            found[service.name] = [pid]
    return found


def machine_busy_cpu() -> float:
    """CPU seconds every core of the machine spent busy so far (not idle, waiting for I/O or
    stolen by a hypervisor), whoever used them."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
    return float(sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0))


@dataclass
class Usage:
    """CPU seconds of the consumer process (tree) and of each service, and its peak RSS."""

    cpu_s: float = 0.0
    servers_cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    rss_samples_mb: list[float] = field(default_factory=list)
    processes_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds of each process of the consumer's tree: ``worker`` alone, or
    ``supervisor`` and ``worker 1``, ``worker 2`` ... in the order they appeared (a restarted
    worker gets the next number)."""
    own_cpu_s: float = 0.0
    """CPU seconds of the measuring process itself (the outcome reader, the sampler)."""
    machine_busy_s: float = 0.0
    """CPU seconds the whole machine was busy, whoever used them."""
    seconds: float = 0.0
    """Wall-clock seconds from start to stop."""


class Sampler:
    """Samples a process tree's memory and each of its processes' CPU while it runs; CPU of
    the services, of this process and of the machine from start to stop.

    ``servers`` names each service's pids (their trees are counted); without it, services
    are found by process name (every Kafka, FerretDB ... on the machine).
    """

    def __init__(
        self,
        pid: int,
        interval: float = 0.25,
        servers: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.usage = Usage()
        self.servers = servers
        self._names: dict[int, str] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._machine_before = machine_busy_cpu()
        self._own = psutil.Process()
        self._own_before = _cpu(self._own)
        self._servers_before = self._servers_cpu()
        self._cpu_before = self._tree_cpu()
        self._sample_cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _servers_cpu(self) -> dict[str, float]:
        return server_cpu() if self.servers is None else servers_cpu(self.servers)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return []

    def _tree_cpu(self) -> float:
        return sum(_cpu(p) for p in self._tree())

    def _sample_cpu(self) -> None:
        """Each process's CPU so far; one that exits keeps its last sample."""
        with self._lock:
            for proc in self._tree():
                cpu = _cpu(proc)
                if proc.pid not in self._names:
                    self._names[proc.pid] = self._name(proc)
                    self._first[proc.pid] = cpu if proc.pid == self.proc.pid else 0.0
                self._last[proc.pid] = max(cpu, self._last.get(proc.pid, 0.0))

    def _name(self, proc: psutil.Process) -> str:
        if proc.pid != self.proc.pid:
            return f"worker {len(self._names)}"
        with contextlib.suppress(psutil.Error):
            if "--no-supervise" not in proc.cmdline():
                return "supervisor"
        return "worker"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_cpu()
            rss = 0
            for proc in self._tree():
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
            if rss:
                mb = rss / 2**20
                self.usage.rss_samples_mb.append(round(mb, 1))
                self.usage.peak_rss_mb = max(self.usage.peak_rss_mb, mb)

    def stop(self) -> Usage:
        """Stop sampling (call before the process exits, so its CPU is still readable)."""
        self._sample_cpu()
        self.usage.seconds = time.monotonic() - self._started
        self.usage.cpu_s = self._tree_cpu() - self._cpu_before
        after = self._servers_cpu()
        self.usage.servers_cpu_s = {
            name: round(after[name] - self._servers_before.get(name, 0.0), 2) for name in after
        }
        with self._lock:
            self.usage.processes_cpu_s = {
                name: round(self._last[pid] - self._first[pid], 3)
                for pid, name in self._names.items()
            }
        self.usage.own_cpu_s = _cpu(self._own) - self._own_before
        self.usage.machine_busy_s = machine_busy_cpu() - self._machine_before
        self._stop.set()
        self._thread.join()
        return self.usage


@dataclass
class OutcomeWatch:
    """Outcome events as a ``read_committed`` reader sees them, with their arrival times."""

    arrivals: dict[str, float] = field(default_factory=dict)
    decided: dict[str, float] = field(default_factory=dict)
    """When each outcome was durable in MongoDB (the event's ``at``): before its commit."""
    statuses: dict[str, int] = field(default_factory=dict)
    first_arrival: float = 0.0
    count_at_first: int = 0
    last_arrival: float = 0.0

    @property
    def count(self) -> int:
        return len(self.arrivals)

    @property
    def orders_per_s(self) -> float:
        """Outcomes per second after the first batch (start-up and the first fill excluded)."""
        span = self.last_arrival - self.first_arrival
        return (self.count - self.count_at_first) / span if span > 0 else 0.0


def watch_outcomes(
    s: Settings,
    expected: int,
    timeout: float,
    on_progress: Callable[[int], None] | None = None,
    failed: Callable[[], str | None] | None = None,
) -> OutcomeWatch:
    """Read the outcomes topic from the start until ``expected`` orders have an outcome.

    ``failed`` is asked about once a second; when it returns a reason (the worker died),
    waiting stops with a RuntimeError rather than running into the timeout.
    """
    consumer = Consumer(
        s.kafka_config(
            **{
                "group.id": f"bench-watch-{uuid.uuid4().hex[:8]}",
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )
    )
    consumer.subscribe([s.outcomes_topic])
    watch = OutcomeWatch()
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    try:
        while watch.count < expected and time.monotonic() < deadline:
            if failed is not None and time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if (reason := failed()) is not None:
                    raise RuntimeError(f"stopped waiting for outcomes: {reason}")
            # consume(n, timeout) waits for n messages or the timeout, which would add up to
            # the timeout to every arrival time: wait for one message, then take the rest.
            first = consumer.poll(0.1)
            if first is None:
                continue
            messages = [first, *consumer.consume(10_000, 0)]
            now = time.time()
            got = 0
            for message in messages:
                if message.error() is not None:
                    continue
                event = decode_event(message.value() or b"")
                ident = str(event.ident)
                if ident not in watch.arrivals:
                    watch.arrivals[ident] = now
                    watch.decided[ident] = event.at
                    watch.statuses[event.status.value] = (
                        watch.statuses.get(event.status.value, 0) + 1
                    )
                    got += 1
            if got:
                if not watch.first_arrival:
                    watch.first_arrival, watch.count_at_first = now, watch.count
                watch.last_arrival = now
                if on_progress is not None:
                    on_progress(got)
    finally:
        consumer.close()
    return watch


def percentile(values: list[float], q: float) -> float:
    """The ``q`` (0..100) percentile, nearest rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def machine() -> dict[str, Any]:
    """The machine a run measured: CPU model, cores, memory, Python and system."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
