"""Operator commands: orders show, products show|restock, dlq list|show|replay, audit."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from stockflow.cli import TopicOpt, app, console, err, products_app, settings
from stockflow.config import Settings
from stockflow.errors import StockflowError

if TYPE_CHECKING:
    from stockflow.dlq import DeadLetter

REPLAY_CHUNK = 1000
"""Dead letters sent (and flushed) at a time by `dlq replay`, with a progress line between."""

orders_app = typer.Typer(help="What happened to an order.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and replay dead letters.", no_args_is_help=True)
app.add_typer(orders_app, name="orders")
app.add_typer(dlq_app, name="dlq")


def _ident(raw: str) -> list[int | str]:
    """An id as typed: both the number and the string when it looks like a number."""
    return [int(raw), raw] if raw.lstrip("-").isdigit() else [raw]


def _when(at: Any) -> str:
    if not isinstance(at, int | float):
        return "-"
    return dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds")


def _show_record(record: dict[str, Any]) -> None:
    table = Table(show_header=False)
    for key in ("orderId", "restockId", "productId", "quantity", "status", "stockAfter", "reason"):
        if key in record and record[key] is not None:
            table.add_row(key, str(record[key]))
    if record.get("source"):
        table.add_row("source", str(record["source"]))
    table.add_row("at", _when(record.get("at")))
    for duplicate in record.get("duplicates") or []:
        table.add_row("duplicate", str(duplicate))
    console.print(table)


@orders_app.command("show")
def orders_show(order_id: Annotated[str, typer.Argument(help="The order's orderId.")]) -> None:
    """Show an order's outcome: status, stock after it, where it came from, its duplicates,
    and any dead letter the applier made of it earlier."""
    from stockflow.deadletters import DeadLetterStore
    from stockflow.ledger import Ledger
    from stockflow.pipeline import open_pipeline

    s = settings()
    with open_pipeline(s) as pipeline:
        database = pipeline.mongo[s.database]
        ledger = Ledger(database, s.orders_collection, s.restocks_collection)
        store = DeadLetterStore(database)
        for ident in _ident(order_id):
            record = ledger.find("order", ident)
            history = store.find_command("order", ident)
            if record is not None:
                _show_record(record)
            for letter in history:
                console.print(
                    f"dead-lettered ({letter.get('stage')}) from {letter['_id']} at "
                    f"{_when(letter.get('at'))}: {letter.get('reason')}",
                    markup=False,
                )
            if record is not None or history:
                return
    err.print(f"no outcome recorded for order {order_id!r} (not consumed yet, or unknown)")
    raise typer.Exit(1)


@products_app.command("show")
def products_show(product_id: Annotated[int, typer.Argument(help="The product_id.")]) -> None:
    """Show a product as readers see it (through the Redis cache)."""
    from stockflow.pipeline import open_pipeline

    with open_pipeline(settings()) as pipeline:
        product = pipeline.reader.lookup(product_id)
    if product is None:
        err.print(f"no product {product_id}")
        raise typer.Exit(1)
    console.print_json(json.dumps(product, default=str))


@products_app.command("restock")
def products_restock(
    product_id: Annotated[int, typer.Argument(help="The product_id.")],
    quantity: Annotated[int, typer.Argument(min=1, help="Units to add.")],
    restock_id: Annotated[
        str | None, typer.Option(help="Idempotency key [default: a new random id].")
    ] = None,
    topic: TopicOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the outcome (0: don't).")] = 30,
) -> None:
    """Add stock through the same path as orders (never a direct write), with its own outcome.

    Sending the same --restock-id twice adds the stock once.
    """
    from stockflow.deadletters import DeadLetterStore
    from stockflow.ledger import PENDING, Ledger
    from stockflow.orders import Restock, validate
    from stockflow.pipeline import open_pipeline
    from stockflow.producer import OrderProducer
    from stockflow.topics import require_topic

    s = settings(topic=topic)
    command = Restock(restock_id or f"restock-{uuid.uuid4().hex[:12]}", product_id, quantity)
    validate(command, max_quantity=s.max_quantity)
    require_topic(s, s.topic)
    with OrderProducer(s) as producer:
        producer.send(command)
    console.print(f"restock {command.restock_id}: sent to {s.topic}")
    if wait <= 0:
        return
    with open_pipeline(s) as pipeline:
        database = pipeline.mongo[s.database]
        ledger = Ledger(database, s.orders_collection, s.restocks_collection)
        store = DeadLetterStore(database)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            record = ledger.find("restock", command.restock_id)
            if record is not None and record.get("status") != PENDING:
                _show_record(record)
                return
            dead = store.find_command("restock", command.restock_id)
            if dead:
                reason = dead[-1].get("reason")
                raise StockflowError(f"restock {command.restock_id} was dead-lettered: {reason}")
            time.sleep(0.2)
    err.print(f"no outcome within {wait:.0f}s: is a worker (`stockflow consume`) running?")
    raise typer.Exit(1)


@dlq_app.command("list")
def dlq_list(topic: TopicOpt = None) -> None:
    """List dead letters: where each came from, why, its size and first bytes."""
    from stockflow.dlq import read_dead_letters

    s = settings(topic=topic)
    letters = read_dead_letters(s)
    table = Table("ref", "source", "stage", "reason", "bytes", "value", "time")
    for letter in letters:
        value = (letter.value or b"")[:40].decode(errors="replace")
        size = "-" if letter.size is None else str(letter.size)
        if letter.truncated:
            size += " (cut)"
        table.add_row(
            letter.ref,
            str(letter.source),
            letter.stage,
            letter.reason,
            size,
            value,
            _when(letter.time),
        )
    console.print(table)
    console.print(f"{len(letters)} dead letter(s) on {s.dlq_topic}")


def _find(s: Settings, ref: str) -> DeadLetter:
    from stockflow.dlq import read_dead_letters, select

    [letter] = select(read_dead_letters(s), refs=[ref])
    return letter


@dlq_app.command("show")
def dlq_show(
    ref: Annotated[str, typer.Argument(help="partition:offset, from `dlq list`")],
    raw: Annotated[
        bool, typer.Option("--raw", help="Write only the original bytes to stdout.")
    ] = False,
    topic: TopicOpt = None,
) -> None:
    """Show one dead letter whole: its reason, source, headers and original bytes.

    A dead letter too large for the topic was cut to fit; its original comes from MongoDB.
    """
    from stockflow.deadletters import DeadLetterStore
    from stockflow.dlq import original_of, parse_ref
    from stockflow.pipeline import open_pipeline

    parse_ref(ref)
    s = settings(topic=topic)
    letter = _find(s, ref)
    with open_pipeline(s) as pipeline:
        original = original_of(letter, DeadLetterStore(pipeline.mongo[s.database]))
    if raw:
        sys.stdout.buffer.write(original.value)
        sys.stdout.buffer.flush()
        return
    cut = f" (the topic's copy lacks: {', '.join(letter.truncated)})" if letter.truncated else ""
    console.print(f"ref:      {letter.ref}\nsource:   {letter.source}\nstage:    {letter.stage}")
    console.print(f"reason:   {letter.reason}", markup=False)
    console.print(f"time:     {_when(letter.time)}\nattempts: {letter.attempts}")
    console.print(f"size:     {len(original.value)} bytes{cut}\nsha256:   {original.sha256}")
    for name, value in original.headers:
        console.print(f"header:   {name}={value!r}", markup=False)
    console.print(f"key:      {original.key!r}\nvalue:    {original.value!r}", markup=False)


@dlq_app.command("replay")
def dlq_replay(
    refs: Annotated[
        list[str] | None, typer.Argument(help="partition:offset of each to replay")
    ] = None,
    reason: Annotated[
        str | None,
        typer.Option(help="Also replay every dead letter whose reason contains TEXT."),
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    again: Annotated[
        bool,
        typer.Option(help="With --reason/--all, include dead letters replayed before."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be re-sent; send nothing.")
    ] = False,
    value: Annotated[
        str | None, typer.Option(help="Corrected message to send instead (one ref only).")
    ] = None,
    topic: TopicOpt = None,
) -> None:
    """Publish dead letters to the input topic again, whole, as they are or corrected.

    Choose them by ref, by --reason, or --all (those two skip dead letters replayed before,
    unless --again). A replayed order keeps its orderId, so replaying it twice applies it once.
    """
    from stockflow.deadletters import DeadLetterStore
    from stockflow.dlq import original_of, read_dead_letters, replay, select
    from stockflow.pipeline import open_pipeline

    if not refs and reason is None and not every:
        raise StockflowError("name the dead letters to replay: REF..., --reason TEXT or --all")
    s = settings(topic=topic)
    letters = read_dead_letters(s)
    chosen = select(letters, refs=refs or [], reason=reason, every=every)
    with open_pipeline(s) as pipeline:
        store = DeadLetterStore(pipeline.mongo[s.database])
        if (reason is not None or every) and not again:
            named = set(refs or [])
            done = store.replayed([c.source for c in chosen if c.source is not None])
            skipped = [c for c in chosen if c.source in done and c.ref not in named]
            chosen = [c for c in chosen if c not in skipped]
            if skipped:
                console.print(f"skipping {len(skipped)} dead letter(s) replayed before (--again)")
        if value is not None and len(chosen) != 1:
            raise StockflowError(f"--value replaces one dead letter; {len(chosen)} selected")
        for letter in chosen:
            original = original_of(letter, store)
            if dry_run:
                console.print(
                    f"would replay {letter.ref} ({letter.source}, {len(original.value)} bytes): "
                    f"{letter.reason}",
                    markup=False,
                )
        if dry_run:
            console.print(f"dry run: {len(chosen)} dead letter(s) would be replayed to {s.topic}")
            return
        sent = 0
        for start in range(0, len(chosen), REPLAY_CHUNK):
            chunk = chosen[start : start + REPLAY_CHUNK]
            sent += replay(s, chunk, store, value=value.encode() if value is not None else None)
            if len(chosen) > REPLAY_CHUNK:
                err.print(f"replayed {sent}/{len(chosen)}")
    console.print(f"replayed {sent} dead letter(s) to {s.topic}")


@app.command()
def audit(
    topic: TopicOpt = None,
    messages: Annotated[
        bool, typer.Option(help="Also account for every input message (reads the topics).")
    ] = True,
) -> None:
    """Recompute stock from the recorded outcomes and check every message has one outcome.

    Exits 1 on any discrepancy.
    """
    from stockflow.audit import run_audit
    from stockflow.pipeline import open_pipeline

    s = settings(topic=topic)
    with open_pipeline(s) as pipeline:
        report = run_audit(s, pipeline, messages=messages)
    console.print(
        f"checked {report.products_checked} product(s), {report.messages_checked} message(s); "
        f"outcomes: {dict(sorted(report.outcomes.items()))}"
        + (f"; {report.replayed} dead letter(s) replayed" if report.replayed else "")
    )
    for title, rows in (
        ("stock differs from outcomes", report.stock_mismatches),
        ("negative stock", report.negative_stock),
        ("message without an outcome", report.without_outcome),
        ("message with several outcomes", report.several_outcomes),
        ("record still pending", report.pending),
    ):
        for row in rows[:20]:
            console.print(f"[red]{title}:[/red] {row}")
        if len(rows) > 20:
            console.print(f"[red]{title}:[/red] ... and {len(rows) - 20} more")
    console.print(f"discrepancies: {report.discrepancies}")
    if not report.ok:
        raise typer.Exit(1)
