"""A stockflow worker: the router and the applier, each a consumer-group member, side by side.

Run as many workers as there are cores to spare: Kafka spreads the input partitions over the
routers and the commands-topic partitions (one per product group) over the appliers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from stockflow.applier import Applier
from stockflow.config import Settings
from stockflow.consumer import LoopStats, TransactionalLoop
from stockflow.deadletters import DeadLetterStore
from stockflow.errors import ConfigError
from stockflow.ledger import Ledger
from stockflow.pipeline import Pipeline
from stockflow.planner import Decision
from stockflow.router import Router
from stockflow.topics import create_topic, end_offsets, require_topic, topic_id

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings) -> None:
    """Create the commands, dead-letter and outcomes topics if they are missing, replicated as
    the cluster allows (min(3, brokers), with min.insync.replicas 2 at 3)."""
    partitions = require_topic(settings, settings.topic)
    create_topic(settings, settings.commands_topic, partitions=settings.commands_partitions)
    create_topic(settings, settings.dlq_topic, partitions=max(1, partitions))
    create_topic(settings, settings.outcomes_topic, partitions=settings.commands_partitions)


@dataclass
class WorkerStats:
    """What the two stages committed."""

    router: LoopStats = field(default_factory=LoopStats)
    applier: LoopStats = field(default_factory=LoopStats)
    applier_steps: dict[str, float] = field(default_factory=dict)
    """Seconds the applier spent in each step of its batches."""
    refused_writes: int = 0
    """The applier's product writes refused by the compare-and-set (another writer was first)."""

    @property
    def outcomes(self) -> Counter[str]:
        counts = Counter(self.applier.counts)
        counts["dead_lettered"] += self.router.counts["dead_lettered"]
        return +counts

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (
            f"routed {self.router.messages} message(s), applied {self.applier.messages} "
            f"command(s)" + (f": {parts}" if parts else "")
        )

    def as_dict(self) -> dict[str, object]:
        """Everything above as plain data (``stockflow consume --stats-file``)."""

        def rounded(counter: Mapping[str, float]) -> dict[str, float]:
            return {k: round(v, 3) for k, v in sorted(counter.items())}

        return {
            "outcomes": dict(self.outcomes),
            **{
                name: {
                    "messages": loop.messages,
                    "batches": loop.batches,
                    "rewinds": loop.rewinds,
                    "dropped": loop.dropped,
                    "unproducible": loop.unproducible,
                    "seconds": rounded(loop.seconds),
                }
                for name, loop in (("router", self.router), ("applier", self.applier))
            },
            "applier_seconds": rounded(self.applier_steps),
            "refused_writes": self.refused_writes,
        }


class Worker:
    """Runs a router and an applier until stopped (or idle)."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        *,
        listener: Callable[[Decision], None] | None = None,
        roles: tuple[str, ...] = ("router", "applier"),
        start_at_end: bool = False,
    ) -> None:
        """``start_at_end``: ignore committed offsets and read only messages sent from now on."""
        self.settings = settings
        ledger = Ledger(
            pipeline.mongo[settings.database],
            settings.orders_collection,
            settings.restocks_collection,
            pool=pipeline.pool,
        )
        ledger.ensure_indexes()
        store = DeadLetterStore(pipeline.mongo[settings.database])
        self.applier = Applier(
            settings,
            pipeline.inventory,
            ledger,
            pipeline.cache,
            store,
            # Products' markers name the commands topic by its id, so that a topic recreated
            # under the same name (or another pipeline's) is never taken for this one.
            topic_ids=lambda name: topic_id(settings, name),
        )
        if listener is not None:
            self.applier.listeners.append(listener)
        self.loops: dict[str, TransactionalLoop] = {}
        if start_at_end:
            ensure_topics(settings)
        if "router" in roles:
            self.loops["router"] = TransactionalLoop(
                settings,
                # Commands and dead letters name the input topic's incarnation for the audit.
                Router(settings, store, topic_ids=lambda name: topic_id(settings, name)),
                topics=[settings.topic],
                group_id=settings.router_group_id,
                start_offsets=end_offsets(settings, settings.topic) if start_at_end else None,
            )
        if "applier" in roles:
            commands = settings.commands_topic
            self.loops["applier"] = TransactionalLoop(
                settings,
                self.applier,
                topics=[commands],
                group_id=settings.group_id,
                start_offsets=end_offsets(settings, commands) if start_at_end else None,
            )
            # Each finished MongoDB step is progress: only a call that hangs trips the watchdog.
            self.applier.on_progress = self.loops["applier"].progress
        if "router" in self.loops and "applier" in self.loops:
            # Commands routed while the applier is busy would only wait for it: let the router
            # fill its batch meanwhile (bounded), for fewer transactions.
            applier_loop = self.loops["applier"]
            self.loops["router"].hold = lambda: applier_loop.busy
            self.loops["router"].hold_ms = settings.router_hold_ms
        self.stats = WorkerStats()
        self.errors: list[BaseException] = []

    def health(self) -> dict[str, dict[str, object]]:
        """Each stage's circuit state and progress, for health checks and (later) metrics."""
        return {
            name: {
                "circuit": loop.handler.breaker.state.value,
                "failures": loop.handler.breaker.failures,
                "last_error": loop.handler.breaker.last_error,
                "paused": loop.paused,
                "messages": loop.stats.messages,
                "batches": loop.stats.batches,
                "rewinds": loop.stats.rewinds,
                "dropped": loop.stats.dropped,
                "unproducible": loop.stats.unproducible,
                "idle_seconds": round(time.monotonic() - loop.idle_since, 1),
            }
            for name, loop in self.loops.items()
        }

    def stop(self) -> None:
        for loop in self.loops.values():
            loop.stop()

    def wait_assigned(self, timeout: float) -> bool:
        return all(loop.assigned.wait(timeout) for loop in self.loops.values())

    def run(
        self, *, idle_timeout: float | None = None, max_messages: int | None = None
    ) -> WorkerStats:
        """Run both stages; with ``idle_timeout``, return once neither has work for that long;
        with ``max_messages``, once that many input messages are committed and the commands
        routed from them applied (an applier alone counts the commands it applies)."""
        ensure_topics(self.settings)
        threads = []
        for name, loop in self.loops.items():
            thread = threading.Thread(
                target=self._run_loop,
                args=(name, loop, idle_timeout, max_messages),
                name=f"stockflow-{name}",
            )
            thread.start()
            threads.append(thread)
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:
            self.stop()
            for thread in threads:
                thread.join()
            raise
        self.stats.applier_steps = dict(self.applier.seconds)
        self.stats.refused_writes = self.applier.refused_writes
        if self.errors:
            raise self.errors[0]
        return self.stats

    def _run_loop(
        self,
        name: str,
        loop: TransactionalLoop,
        idle_timeout: float | None,
        max_messages: int | None,
    ) -> None:
        follows = name == "applier" and "router" in self.loops
        try:
            # The applier beside a bounded router is bounded by what the router routes.
            result = loop.run(
                idle_timeout=idle_timeout, max_messages=None if follows else max_messages
            )
            setattr(self.stats, name, result)
            if name == "router" and max_messages is not None and "applier" in self.loops:
                self.loops["applier"].max_messages = result.counts["routed"]
        except BaseException as exc:
            if isinstance(exc, ConfigError):  # one line, said once by whoever runs the worker
                log.debug("%s stopped: %s", name, exc)
            else:
                log.exception("%s stopped with an error", name)
            self.errors.append(exc)
            self.stop()
