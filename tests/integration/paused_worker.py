"""``stockflow consume`` that freezes itself with SIGSTOP between reading a batch's products and
writing them: the zombie of ``test_zombie.py`` and of the chaos scenario ``paused-workers``,
paused at the one point that matters.

Usage: ``python paused_worker.py TRIGGER -- consume --no-supervise ...``, where ``{pid}`` in
TRIGGER stands for the worker's process id. The worker runs as ``stockflow`` does; whenever
TRIGGER exists as its applier is about to write products, it deletes TRIGGER, prints what it
planned and stops itself (the whole process: every thread, librdkafka's heartbeats included,
as an external ``kill -STOP`` would). Once continued (SIGCONT), it prints the fate of each
product write (refused by the compare-and-set, or written) and each assignment or revocation
of its stages, as ``paused-worker: {json}`` lines on stdout, beside its own log.

A stop sent from outside could land anywhere, between batches most often; stopping here is
what makes the test deterministic. Only this harness is patched, never stockflow's code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from stockflow.cli import main
from stockflow.consumer import ConsumerLike, TransactionalLoop
from stockflow.errors import ConcurrentWriteError
from stockflow.inventory import Inventory
from stockflow.planner import ProductChange

PREFIX = "paused-worker: "


def say(event: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


def described(change: ProductChange) -> dict[str, Any]:
    writer = change.marker["topics"][-1]  # the writing partition's entry comes last
    return {
        "product": change.product_id,
        "expected_stock": change.expected_stock,
        "expected_version": change.expected_version,
        "new_stock": change.new_stock,
        "v": change.marker["v"],
        "partition": writer["partition"],
        "last": writer["last"],
    }


def patch(trigger: Path) -> None:
    traced_since_pause = False
    write = Inventory.write_changes
    continued = threading.Event()
    # SIGCONT still continues the process; the handler (run by the main thread) also tells
    # the applier's thread, which may run a few instructions after its own kill() returns.
    signal.signal(signal.SIGCONT, lambda *_: continued.set())

    def write_changes(self: Inventory, changes: Sequence[ProductChange]) -> None:
        nonlocal traced_since_pause
        if changes and trigger.exists():
            trigger.unlink()
            continued.clear()
            say("frozen", changes=[described(c) for c in changes])
            os.kill(os.getpid(), signal.SIGSTOP)
            continued.wait()
            say("resumed")
            traced_since_pause = True
        if not traced_since_pause:
            return write(self, changes)
        try:
            write(self, changes)
        except ConcurrentWriteError as exc:
            say("write", products=len(changes), refused=True, why=str(exc))
            raise
        say("write", products=len(changes), refused=False, changes=[described(c) for c in changes])
        return None

    def traced(name: str, method: Any) -> Any:
        def hook(
            loop: TransactionalLoop, consumer: ConsumerLike, partitions: list[TopicPartition]
        ) -> None:
            method(loop, consumer, partitions)
            if traced_since_pause:
                say(name, stage=loop.handler.name, partitions=[tp.partition for tp in partitions])

        return hook

    Inventory.write_changes = write_changes  # type: ignore[method-assign]
    TransactionalLoop._on_assign = traced("assigned", TransactionalLoop._on_assign)  # type: ignore[method-assign]
    TransactionalLoop._on_revoke = traced("revoked", TransactionalLoop._on_revoke)  # type: ignore[method-assign]


if __name__ == "__main__":
    trigger, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: paused_worker.py TRIGGER -- consume ..."
    patch(Path(trigger.format(pid=os.getpid())))
    sys.argv = ["stockflow", *args]
    main()
