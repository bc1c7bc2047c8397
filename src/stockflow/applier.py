"""Stage 2: apply the commands of one product partition to MongoDB, exactly once in effect.

Every stock change of a product arrives on one partition of the commands topic, and each
partition has one consumer, so each product has a single writer. For a batch:

1. claim each command's id in the ledger (first delivery wins; a later copy is a duplicate);
2. load the batch's products and plan every outcome (``planner``, pure and deterministic);
3. write each product's change as a compare-and-set on the stock and marker it was planned
   from (the marker also lets a replay after a crash recognise what was already written);
4. finish the ledger records;
5. hand the outcome events (and dead letters) to the transaction that also commits offsets;
6. once committed: refresh the cache and print the seed's lines.

Any crash between steps is repaired by replaying the batch: every step is idempotent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

from confluent_kafka import Message
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from stockflow.cache import ProductCache
from stockflow.config import Settings
from stockflow.errors import InvalidOrderError, TransientError
from stockflow.inventory import Inventory
from stockflow.ledger import Ledger, to_event
from stockflow.outcomes import Outcome, dead_letter_headers, source_of
from stockflow.planner import Decision, Entry, plan_batch
from stockflow.retry import CircuitBreaker
from stockflow.router import H_SOURCE, decode_message, decode_source
from stockflow.txloop import Handled, Output

log = logging.getLogger("stockflow.orders")

# Errors a MongoDB-compatible server reports while it is starting, stepping down or busy.
TRANSIENT_CODES = {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}


class Applier:
    """The stage-2 handler."""

    name = "applier"

    def __init__(
        self, settings: Settings, inventory: Inventory, ledger: Ledger, cache: ProductCache
    ) -> None:
        self.settings = settings
        self.inventory = inventory
        self.ledger = ledger
        self.cache = cache
        self.breaker = CircuitBreaker("MongoDB")
        self.listeners: list[Callable[[Decision], None]] = []
        """Called with each decision once its batch is committed (demo, tests, metrics)."""

    def handle(self, messages: Sequence[Message]) -> Handled:
        entries: list[Entry] = []
        outputs: list[Output] = []
        counts: Counter[str] = Counter()
        for message in messages:
            position = source_of(message)
            headers = dict(message.headers() or [])
            source = decode_source(headers.get(H_SOURCE)) or position
            try:
                command = decode_message(self.settings, message)
            except InvalidOrderError as exc:
                outputs.append(self.dead_letter(message, f"bad command: {exc.reason}", 1))
                counts[Outcome.DEAD_LETTERED.value] += 1
                continue
            entries.append(Entry(position, source, command))
        try:
            decisions = self._apply(entries)
        except ConnectionFailure as exc:
            raise TransientError(f"MongoDB unreachable: {exc}") from exc
        except OperationFailure as exc:
            if exc.code in TRANSIENT_CODES:
                raise TransientError(f"MongoDB busy: {exc}") from exc
            raise
        at = time.time()
        by_position = {(m.partition(), m.offset()): m for m in messages}
        for decision in decisions:
            counts[decision.outcome.value] += 1
            event = to_event(decision, at)
            key = str(decision.entry.command.product_id).encode()
            outputs.append(Output(self.settings.outcomes_topic, event.encode(), key=key))
            if decision.outcome is Outcome.DEAD_LETTERED:
                position = decision.entry.position
                message = by_position[(position.partition, position.offset)]
                outputs.append(self.dead_letter(message, decision.reason or "unusable", 1))
        changed = {d.entry.command.product_id for d in decisions if d.outcome is Outcome.APPLIED}

        def after_commit() -> None:
            self._refresh_cache(changed)
            for decision in decisions:
                _log_decision(decision)
                for listener in self.listeners:
                    listener(decision)

        return Handled(outputs, after_commit, counts)

    def _apply(self, entries: list[Entry]) -> list[Decision]:
        if not entries:
            return []
        owners = self.ledger.claim(entries)
        products = self.inventory.load(e.command.product_id for e in entries)
        plan = plan_batch(entries, products, owners)
        self.inventory.write_changes(plan.changes)
        self.ledger.finish(plan.decisions, time.time())
        return plan.decisions

    def _refresh_cache(self, product_ids: set[int]) -> None:
        if not product_ids and not self.cache.stale:
            return
        try:
            products = self.inventory.load(product_ids)
        except PyMongoError as exc:  # the change is durable; the cache can catch up later
            log.warning("cache refresh skipped: %s", exc)
            self.cache.stale.update(product_ids)
            return
        self.cache.refresh(p for p in products.values() if p is not None)

    def dead_letter(self, message: Message, reason: str, attempts: int) -> Output:
        headers = dict(message.headers() or [])
        source = decode_source(headers.get(H_SOURCE)) or source_of(message)
        return Output(
            self.settings.dlq_topic,
            message.value(),
            key=message.key(),
            headers=dead_letter_headers(reason, source, attempts=attempts),
        )


def _log_decision(decision: Decision) -> None:
    command = decision.entry.command
    pid, qty = command.product_id, command.quantity
    if command.kind == "restock":
        if decision.outcome is Outcome.APPLIED:
            log.info("Restocked product %s by %s, new stock: %s", pid, qty, decision.stock_after)
        else:
            log.info("Restock %s for product %s: %s", command.id, pid, decision.outcome.value)
        return
    log.info("Processing order for product %s, quantity: %s", pid, qty)
    if decision.outcome is Outcome.APPLIED:
        log.info("Product stock updated for product %s, new stock: %s", pid, decision.stock_after)
    elif decision.outcome is Outcome.INSUFFICIENT_STOCK:
        log.info(
            "Insufficient stock for product %s: ordered %s, in stock %s (order %s not applied)",
            pid, qty, decision.stock_after, command.id,
        )  # fmt: skip
    elif decision.outcome is Outcome.UNKNOWN_PRODUCT:
        log.warning("Unknown product %s: order %s rejected", pid, command.id)
    elif decision.outcome is Outcome.DUPLICATE:
        log.warning("Duplicate order %s (%s): not applied again", command.id, decision.reason)
    else:
        log.error("Order %s dead-lettered: %s", command.id, decision.reason)
