"""Stage 2: apply the commands of one product partition to MongoDB, exactly once in effect.

Every stock change of a product arrives on one partition of the commands topic, and each
partition has one consumer, so each product has a single writer per pipeline (several
pipelines sharing products are serialised by the compare-and-set). For a batch:

1. claim each command's id in the ledger (first delivery wins; a later copy is a duplicate);
2. take the batch's products and plan every outcome (``planner``, pure and deterministic);
3. write each product's change as a compare-and-set on the stock and marker it was planned
   from (the marker also lets a replay after a crash recognise what its commands topic, named
   by Kafka's topic id, already wrote);
4. record the outcomes in the ledger (a dead-lettered command gets none: its claim is released,
   so that its replay is decided afresh);
5. refresh the cache entries of the products changed (MongoDB holds the change already);
6. keep the dead letters' originals in MongoDB, and hand the outcome events and dead letters
   to the transaction that also commits offsets;
7. once committed: print the seed's lines.

Any crash between steps is repaired by replaying the batch: every step is idempotent.

As the single writer of its partitions' products, the applier keeps the products it wrote
in memory (:class:`ProductMemory`) instead of reading them for every batch. Memory is only a
guess: every write is a compare-and-set, so a guess that went stale (someone else wrote the
product) fails the write, and the batch is planned again from what MongoDB holds. A product
whose outcomes need no write (every order rejected) is read back before they count. Memory is
cleared whenever the consumer's partitions change.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from confluent_kafka import Message
from pymongo.errors import PyMongoError

from stockflow.cache import ProductCache, product_version
from stockflow.config import Settings
from stockflow.consumer import Handled, Output
from stockflow.deadletters import DeadLetterStore, FittedLetter, build, size_limit
from stockflow.errors import (
    AccessDeniedError,
    ConcurrentWriteError,
    InvalidOrderError,
    TopicError,
    TransientError,
)
from stockflow.inventory import Inventory, Product
from stockflow.ledger import Ledger, to_event
from stockflow.mongo import auth_error, classify
from stockflow.orders import Command
from stockflow.outcomes import Outcome, source_of
from stockflow.planner import MARKER, Decision, Entry, Plan, ProductChange, plan_batch
from stockflow.retry import CircuitBreaker
from stockflow.router import H_SOURCE, H_SOURCE_ID, decode_message, decode_source

log = logging.getLogger("stockflow.orders")
"""The seed's per-order lines (``consume --quiet`` keeps only its warnings)."""
events = logging.getLogger(__name__)

PLAN_ATTEMPTS = 3
"""Plans of one batch before giving up on products that keep changing under the writer."""


class ProductMemory:
    """The products an applier last read or wrote, by product id (see the module's docs)."""

    def __init__(self, limit: int = 200_000) -> None:
        self._docs: dict[int, Product] = {}
        self.limit = limit
        self._warm = False

    def get(self, product_id: int) -> Product | None:
        return self._docs.get(product_id)

    def products(
        self, wanted: Iterable[int], inventory: Inventory
    ) -> tuple[dict[int, Product | None], set[int]]:
        """The wanted products, from memory or (for the rest) one read of MongoDB; and which
        of them came from memory."""
        found: dict[int, Product | None] = {pid: self._docs.get(pid) for pid in wanted}
        remembered = {pid for pid, doc in found.items() if doc is not None}
        missing = [pid for pid, doc in found.items() if doc is None]
        if missing and not self._warm:
            # The first batch after the partitions changed reads the whole catalogue (up to
            # ``limit`` products; it costs FerretDB what one `$in` does), so that later,
            # busier batches find their products here instead of stalling on the read.
            self._warm = True
            for every in inventory.load_all(self.limit) or []:
                self._docs.setdefault(every["product_id"], every)
            for pid in missing:
                found[pid] = self._docs.get(pid)
            missing = [pid for pid, doc in found.items() if doc is None]
        if missing:
            for pid, doc in inventory.load(missing).items():
                found[pid] = doc
                if doc is not None:
                    self._remember(pid, doc)
        return found, remembered

    def confirm(self, docs: Sequence[Product], inventory: Inventory) -> bool:
        """Check remembered products against MongoDB; False (and memory fixed) if any changed."""
        if not docs:
            return True
        current = {doc["_id"]: doc for doc in inventory.current(d["_id"] for d in docs)}
        same = True
        for doc in docs:
            fresh = current.get(doc["_id"])
            pid = doc["product_id"]
            if fresh is None or fresh.get("product_id") != pid:
                self._docs.pop(pid, None)
                same = False
            elif fresh.get("stock") != doc.get("stock") or product_version(
                fresh
            ) != product_version(doc):
                self._docs[pid] = fresh
                same = False
        return same

    def wrote(self, changes: Sequence[ProductChange], before: Mapping[int, Product | None]) -> None:
        for change in changes:
            doc = before.get(change.product_id)
            if doc is not None:
                self._remember(
                    change.product_id, {**doc, "stock": change.new_stock, MARKER: change.marker}
                )

    def forget(self, product_ids: Iterable[int]) -> None:
        for pid in product_ids:
            self._docs.pop(pid, None)

    def clear(self) -> None:
        self._docs.clear()
        self._warm = False

    def _remember(self, product_id: int, doc: Product) -> None:
        if len(self._docs) >= self.limit and product_id not in self._docs:
            self._docs.clear()  # a crude bound: start again rather than grow without limit
        self._docs[product_id] = doc


class Applier:
    """The stage-2 handler."""

    name = "applier"

    def __init__(
        self,
        settings: Settings,
        inventory: Inventory,
        ledger: Ledger,
        cache: ProductCache,
        store: DeadLetterStore | None = None,
        *,
        topic_ids: Callable[[str], str | None] | None = None,
    ) -> None:
        """``topic_ids`` looks up Kafka's id of a commands topic (None: names alone)."""
        self.settings = settings
        self.inventory = inventory
        self.ledger = ledger
        self.cache = cache
        self._store = store
        self.limit = size_limit(settings)
        self.breaker = CircuitBreaker("MongoDB")
        self.memory = ProductMemory()
        self.topic_ids = topic_ids
        self._known_ids: dict[str, str | None] = {}
        self._read: dict[tuple[str, int], int] = {}
        """The last offset handled of each partition."""
        self.seconds: defaultdict[str, float] = defaultdict(float)
        """Seconds spent in each step of handling batches (for benchmarks and metrics)."""
        self.refused_writes = 0
        """Product writes the compare-and-set refused: the product changed since this applier
        read it (another pipeline's write, or the new owner's of a partition this worker lost
        while it was paused). Each refusal is followed by a fresh read and a new plan."""
        self._last_tick = time.perf_counter()
        self.on_progress: Callable[[], None] = lambda: None
        """Called after each step of a batch (the loop's watchdog: a slow batch that makes
        progress is not a hung one)."""
        self.listeners: list[Callable[[Decision], None]] = []
        """Called with each decision once its batch is committed (demo, tests, metrics)."""

    @property
    def store(self) -> DeadLetterStore:
        """Where dead letters' originals are kept (default: in the ledger's database)."""
        if self._store is None:
            self._store = DeadLetterStore(self.ledger.database)
        return self._store

    def handle(self, messages: Sequence[Message]) -> Handled:
        self._last_tick = time.perf_counter()
        entries: list[Entry] = []
        outputs: list[Output] = []
        letters: list[FittedLetter] = []
        counts: Counter[str] = Counter()
        self._note_rewinds(messages)
        for message in messages:
            position = source_of(message)
            headers = dict(message.headers() or [])
            source = decode_source(headers.get(H_SOURCE)) or position
            try:
                command = decode_message(self.settings, message)
            except InvalidOrderError as exc:
                letters.append(self._letter(message, f"bad command: {exc.reason}", 1))
                outputs.append(self._output(letters[-1]))
                counts[Outcome.DEAD_LETTERED.value] += 1
                continue
            entries.append(
                Entry(
                    position,
                    source,
                    command,
                    self._topic_id(position.topic),
                    _source_id(headers),
                )
            )
        self._clock("decode")
        try:
            decisions = self._apply(entries)
        except PyMongoError as exc:
            # An outage, however long, is waited out; only an error about the batch itself
            # goes on to the retries that end in dead letters (``mongo.classify``); a refusal
            # of the credentials stops the worker (exit 78), whatever the messages are.
            refused = auth_error(exc)
            if refused is not None:
                raise AccessDeniedError(
                    f"MongoDB refused stockflow's credentials or permissions ({refused} on "
                    f"database {self.settings.database}): check the user and password in "
                    "MONGODB_URI and that user's roles"
                ) from exc
            why = classify(exc)
            if why is not None:
                raise TransientError(f"MongoDB unavailable ({why}): {exc}") from exc
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
                reason = decision.reason or "unusable"
                letters.append(self._letter(message, reason, 1, decision.entry.command))
                outputs.append(self._output(letters[-1]))
        # Write-through now, before the commit: MongoDB already holds these changes (a replay
        # only re-derives them), so the cache is right even if the commit fails, and no crash
        # can fall between publishing an outcome and refreshing the entry it changed.
        applied = {d.entry.command.product_id for d in decisions if d.outcome is Outcome.APPLIED}
        self.cache.refresh(doc for pid in applied if (doc := self.memory.get(pid)) is not None)
        self._clock("refresh cache")
        if letters:
            self.store.keep(letters)  # the originals are durable before the dead letters commit

        def after_commit() -> None:
            for decision in decisions:
                _log_decision(decision)
                for listener in self.listeners:
                    listener(decision)

        return Handled(outputs, after_commit, counts)

    def _apply(self, entries: list[Entry]) -> list[Decision]:
        if not entries:
            return []
        clock = self._clock
        owners = self.ledger.claim(entries)
        clock("claim ids")
        wanted = {e.command.product_id for e in entries}
        for attempt in range(1, PLAN_ATTEMPTS + 1):
            products, remembered = self.memory.products(wanted, self.inventory)
            clock("read products")
            plan = plan_batch(entries, products, owners)
            clock("plan")
            unchecked = self._unwritten(plan, products, remembered)
            confirmed = self.memory.confirm(unchecked, self.inventory)
            clock("read products")
            if not confirmed:
                continue  # a product was not as remembered: plan again from the fresh state
            try:
                self.inventory.write_changes(plan.changes)
            except ConcurrentWriteError as exc:
                self.refused_writes += exc.refused
                events.warning(
                    "applier: %s, refused by the compare-and-set (plan %d of %d); reading them "
                    "again", exc, attempt, PLAN_ATTEMPTS,
                )  # fmt: skip
                self.memory.forget(wanted)
                if attempt == PLAN_ATTEMPTS:
                    raise
                continue
            finally:
                clock("write products")
            self.memory.wrote(plan.changes, products)
            self.ledger.finish(plan.decisions, time.time())
            clock("record outcomes")
            return plan.decisions
        raise ConcurrentWriteError("products kept changing under this writer")

    def _clock(self, step: str) -> None:
        """Add the time since the last call to ``step`` (where the applier's time goes)."""
        now = time.perf_counter()
        self.seconds[step] += now - self._last_tick
        self._last_tick = now
        self.on_progress()

    @staticmethod
    def _unwritten(
        plan: Plan, products: Mapping[int, Product | None], remembered: set[int]
    ) -> list[Product]:
        """Remembered products whose decisions no compare-and-set will check."""
        changed = {c.product_id for c in plan.changes}
        decided = {
            d.entry.command.product_id for d in plan.decisions if d.outcome is not Outcome.DUPLICATE
        }
        unchecked = (decided - changed) & remembered
        return [doc for pid in unchecked if (doc := products.get(pid)) is not None]

    def on_partitions_changed(self) -> None:
        """Another consumer may have written these products meanwhile: remember nothing; and
        the commands topic may have been recreated: learn its id again."""
        self.memory.clear()
        self._known_ids.clear()
        self._read.clear()

    def _note_rewinds(self, messages: Sequence[Message]) -> None:
        """Look the commands topic's id up again when a partition is read from an earlier
        offset than before: a rewound batch (a needless look-up), or the topic deleted and
        recreated under this consumer, which librdkafka reads from its start again without
        any rebalance."""
        for message in messages:
            key = (message.topic() or "", message.partition() or 0)
            offset = message.offset() or 0
            if offset <= self._read.get(key, -1):
                self._known_ids.pop(key[0], None)
            self._read[key] = offset

    def _topic_id(self, topic: str) -> str | None:
        """Kafka's id of the commands topic, looked up once per assignment."""
        if self.topic_ids is None:
            return None
        if topic not in self._known_ids:
            try:
                self._known_ids[topic] = self.topic_ids(topic)
            except TopicError as exc:
                raise TransientError(f"cannot learn the id of topic {topic!r}: {exc}") from exc
        return self._known_ids[topic]

    def dead_letter(self, message: Message, reason: str, attempts: int) -> Output:
        """The dead letter of a message that kept failing: its original kept in MongoDB, and
        the claim its attempts may have made released (so that its replay is decided afresh).
        """
        position = source_of(message)
        headers = dict(message.headers() or [])
        source = decode_source(headers.get(H_SOURCE)) or position
        try:
            command: Command | None = decode_message(self.settings, message)
        except InvalidOrderError:
            command = None
        letter = self._letter(message, reason, attempts, command)
        if command is not None:
            try:
                self.ledger.release(
                    [Entry(position, source, command, self._known_ids.get(position.topic))]
                )
            except PyMongoError as exc:
                raise TransientError(f"MongoDB: cannot release a claim: {exc}") from exc
        self.store.keep([letter])
        return self._output(letter)

    def _letter(
        self, message: Message, reason: str, attempts: int, command: Command | None = None
    ) -> FittedLetter:
        headers = dict(message.headers() or [])
        return build(
            value=message.value(),
            key=message.key(),
            original_headers=None,  # the commands topic's own headers, not the input's
            reason=reason,
            source=decode_source(headers.get(H_SOURCE)) or source_of(message),
            attempts=attempts,
            stage=self.name,
            limit=self.limit,
            details=(
                {"kind": command.kind, "id": command.id, "productId": command.product_id}
                if command is not None
                else None
            ),
            source_id=_source_id(headers),
        )

    def _output(self, letter: FittedLetter) -> Output:
        return Output(
            self.settings.dlq_topic,
            letter.value,
            key=letter.key,
            headers=letter.headers,
            source=letter.source,
        )


def _source_id(headers: Mapping[str, object]) -> str | None:
    """Kafka's id of the input topic, as the router recorded it on a command."""
    raw = headers.get(H_SOURCE_ID)
    return raw.decode(errors="replace") if isinstance(raw, bytes) else None


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
