"""Measuring: CPU and memory of processes, outcomes as they are published, percentiles."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
from confluent_kafka import Consumer

from stockflow.config import Settings
from stockflow.outcomes import decode_event

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
    """CPU seconds used so far by each local service (all its processes)."""
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


@dataclass
class Usage:
    """CPU seconds of the consumer process and of each service, and the consumer's peak RSS."""

    cpu_s: float = 0.0
    servers_cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    rss_samples_mb: list[float] = field(default_factory=list)


class Sampler:
    """Samples a process tree's memory while it runs; CPU from start to stop, its own and
    the servers' (``servers``: every local service by process name unless told otherwise)."""

    def __init__(
        self,
        pid: int,
        interval: float = 0.25,
        servers: Callable[[], dict[str, float]] = server_cpu,
    ) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.usage = Usage()
        self._servers = servers
        self._stop = threading.Event()
        self._servers_before = servers()
        self._cpu_before = self._tree_cpu()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return []

    def _tree_cpu(self) -> float:
        return sum(_cpu(p) for p in self._tree())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
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
        self.usage.cpu_s = self._tree_cpu() - self._cpu_before
        after = self._servers()
        self.usage.servers_cpu_s = {
            name: round(after[name] - self._servers_before.get(name, 0.0), 2) for name in after
        }
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
