"""The audit: recompute stock from the recorded outcomes, and account for every input message.

1. For every product stockflow has changed: ``baseline + restocks applied - orders applied``
   must equal ``stock``, counting the changes that each commands topic in the product's marker
   recorded from its ``since`` offset on (records name their commands topic and its id, so
   several pipelines on one database, or a recreated topic, are told apart); no stock may be
   negative.
2. Every message of the input topic must have exactly one outcome: the record of the id it
   claimed, a place in a claim's duplicates, or a dead letter; no claim may be left without
   its record (pending). A dead letter that was replayed (``stockflow dlq replay`` marks the
   copy with ``stockflow.replayed-from``) is not a final outcome: the replay's outcome is, so
   the outcome counts hold each logical message once. Outcomes are matched to messages by
   input position, counting only those of the input topic's current incarnation: each names
   Kafka's id of the input topic it came from (``sourceId``), so a topic deleted and recreated
   under the same name, whose positions start again at 0, is not taken for its predecessor.
   Outcomes that name no id (recorded before ids were, or on a cluster without them) count.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stockflow.config import Settings
from stockflow.deadletters import header_map
from stockflow.dlq import H_REPLAYED_FROM, read_dead_letters, read_topic_to_end
from stockflow.errors import TopicError
from stockflow.ledger import claims_name, parse_duplicate_note
from stockflow.outcomes import Outcome, Source
from stockflow.pipeline import Pipeline
from stockflow.planner import MARKER, topic_entries
from stockflow.topics import topic_id


@dataclass
class AuditReport:
    """What the audit found; ``ok`` when there is nothing to report."""

    products_checked: int = 0
    messages_checked: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    stock_mismatches: list[str] = field(default_factory=list)
    negative_stock: list[str] = field(default_factory=list)
    without_outcome: list[str] = field(default_factory=list)
    several_outcomes: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    replayed: int = 0
    """Dead letters replayed into the input topic (counted by their replay's outcome)."""

    @property
    def discrepancies(self) -> int:
        return (
            len(self.stock_mismatches)
            + len(self.negative_stock)
            + len(self.without_outcome)
            + len(self.several_outcomes)
            + len(self.pending)
        )

    @property
    def ok(self) -> bool:
        return self.discrepancies == 0


Doc = dict[str, Any]


def _src(value: Any) -> Source | None:
    return Source.parse(value) if isinstance(value, str) else None


def _input_topic_id(settings: Settings) -> str | None:
    try:
        return topic_id(settings, settings.topic)
    except TopicError:
        return None  # no input topic: no message to account for


class _Seen(defaultdict[Source, list[str]]):
    """Outcomes by input position, of the input topic's current incarnation only."""

    def __init__(self, current: str | None) -> None:
        super().__init__(list)
        self.current = current

    def note(self, source: Source | None, source_id: Any, outcome: str) -> bool:
        """Note an outcome of the message at ``source``; False if of another incarnation."""
        if source is None:
            return False
        if isinstance(source_id, str) and self.current is not None and source_id != self.current:
            return False
        self[source].append(outcome)
        return True


def run_audit(settings: Settings, pipeline: Pipeline, *, messages: bool = True) -> AuditReport:
    report = AuditReport()
    database = pipeline.mongo[settings.database]
    seen = _Seen(_input_topic_id(settings) if messages else None)
    deltas: dict[int, list[Change]] = defaultdict(list)
    for kind, name in (
        ("order", settings.orders_collection),
        ("restock", settings.restocks_collection),
    ):
        recorded: set[Any] = set()
        for record in database[name].find({}):
            recorded.add(record["_id"])
            ident = f"{kind} {record['_id']!r}"
            status = record.get("status")
            if status == Outcome.DEAD_LETTERED.value:
                continue  # written by earlier versions: the dead letter itself is the outcome
            report.outcomes[str(status)] += 1
            seen.note(_src(record.get("source")), record.get("sourceId"), f"{ident}: {status}")
            position = _src(record.get("position"))
            if status == Outcome.APPLIED.value and position is not None:
                sign = -1 if kind == "order" else 1
                topic_id = record.get("topicId")
                deltas[int(record["productId"])].append(
                    Change(
                        position,
                        topic_id if isinstance(topic_id, str) else None,
                        sign * int(record["quantity"]),
                    )
                )
        noted: dict[Any, set[str]] = {}  # live claims' duplicates, by id
        released: list[Doc] = []
        for claim in database[claims_name(name)].find({}):
            if claim.get("released"):
                released.append(claim)
                continue
            ident = f"{kind} {claim['_id']!r}"
            noted[claim["_id"]] = set(claim.get("duplicates") or [])
            if claim["_id"] not in recorded:
                report.pending.append(ident)
                seen.note(_src(claim.get("source")), claim.get("sourceId"), f"{ident}: pending")
            _count_duplicates(ident, claim.get("duplicates") or [], seen, report)
        for claim in released:
            # A copy noted on a released claim and again on the id's live claim (its batch was
            # redone after the release, and the id claimed afresh) is one duplicate.
            again = noted.get(claim.get("claimOf"), set())
            dups = [dup for dup in claim.get("duplicates") or [] if dup not in again]
            _count_duplicates(f"{kind} {claim['_id']!r}", dups, seen, report)
    _check_products(pipeline, deltas, report)
    if messages:
        letters = read_dead_letters(settings)
        for letter in letters:
            seen.note(letter.source, letter.source_id, f"dead letter {letter.ref}: {letter.reason}")
        replays: set[str] = set()
        for msg in read_topic_to_end(settings, settings.topic):
            report.messages_checked += 1
            source = Source(settings.topic, msg.partition(), msg.offset())  # type: ignore[attr-defined]
            found = seen.get(source, [])
            if not found:
                report.without_outcome.append(str(source))
            elif len(found) > 1:
                report.several_outcomes.append(f"{source}: {'; '.join(found)}")
            marker = header_map(msg.headers()).get(H_REPLAYED_FROM)  # type: ignore[attr-defined]
            if marker is not None:
                topic, _, ref = marker.rpartition("/")
                if topic == settings.dlq_topic:
                    replays.add(ref)
        for letter in letters:
            if letter.ref in replays:
                report.replayed += 1
            else:
                report.outcomes[Outcome.DEAD_LETTERED.value] += 1
    return report


def _count_duplicates(ident: str, duplicates: list[Any], seen: _Seen, report: AuditReport) -> None:
    for dup in duplicates:
        dup_source, dup_id = parse_duplicate_note(str(dup))
        if seen.note(dup_source, dup_id, f"{ident}: duplicate"):
            report.outcomes[Outcome.DUPLICATE.value] += 1


@dataclass(frozen=True, slots=True)
class Change:
    """An applied record's stock change and where it was on the commands topic."""

    position: Source
    topic_id: str | None
    delta: int


def _counted(marker: Mapping[str, Any], changes: list[Change]) -> int:
    """The sum of the changes the marker counts since its baseline."""
    topics = topic_entries(marker)
    if topics is None:  # a marker of the old form: one partition of some commands topic
        since, partition = int(marker.get("since", 0)), int(marker.get("partition", 0))
        return sum(
            c.delta
            for c in changes
            if c.position.partition == partition and c.position.offset >= since
        )
    return sum(
        c.delta
        for c in changes
        for t in topics
        if c.position.topic == t["topic"]
        and c.position.partition == t["partition"]
        and c.position.offset >= t["since"]
        and (t.get("id") is None or c.topic_id == t["id"])
    )


def _check_products(
    pipeline: Pipeline, deltas: Mapping[int, list[Change]], report: AuditReport
) -> None:
    for product in pipeline.inventory.products.find({}):
        report.products_checked += 1
        pid = product.get("product_id")
        stock = product.get("stock")
        if isinstance(stock, int | float) and stock < 0:
            report.negative_stock.append(f"product {pid}: stock {stock}")
        marker = product.get(MARKER)
        if not isinstance(marker, Mapping) or "baseline" not in marker or not isinstance(pid, int):
            continue
        expected = int(marker["baseline"]) + _counted(marker, deltas.get(pid, []))
        if expected != stock:
            report.stock_mismatches.append(
                f"product {pid}: stock {stock}, expected {expected} from its outcomes"
            )
