"""The ``stockflow`` command line: thin over the modules it calls."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from stockflow.worker import WorkerStats

from stockflow.config import Settings, load_settings
from stockflow.errors import (
    EXIT_CONFIG,
    ConfigError,
    InvalidOrderError,
    StockflowError,
)

# Not a terminal (pipes, CI logs): no wrapping at 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)

app = typer.Typer(
    name="stockflow",
    help="A real-time order -> stock pipeline: orders from Kafka applied to MongoDB stock, "
    "with Redis-cached product reads. Service addresses come from KAFKA_BOOTSTRAP_SERVERS, "
    "MONGODB_URI and REDIS_URL, or default to the local stack (`stockflow stack up`); every "
    "other setting from STOCKFLOW_* variables (see README.md).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stack_app = typer.Typer(
    help="Start, stop and inspect the local Kafka, FerretDB and Redis.", no_args_is_help=True
)
topics_app = typer.Typer(help="Create and list Kafka topics.", no_args_is_help=True)
products_app = typer.Typer(help="Create and inspect products in MongoDB.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(products_app, name="products")

TopicOpt = Annotated[
    str | None, typer.Option("--topic", "-t", help="Topic to use [default: STOCKFLOW_TOPIC]")
]


def settings(**overrides: Any) -> Settings:
    """The settings, with the command line's options (those given) over the environment."""
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


@app.callback()
def _main(
    verbose: Annotated[
        bool | None,
        typer.Option("--verbose", "-v", help="Debug logging [default: STOCKFLOW_VERBOSE]."),
    ] = None,
    timestamps: Annotated[
        bool | None,
        typer.Option(
            "--timestamps/--no-timestamps",
            help="Prefix log lines with the time [default: STOCKFLOW_LOG_TIMESTAMPS].",
        ),
    ] = None,
) -> None:
    from stockflow.logs import setup_logging

    try:
        s = settings(verbose=verbose, log_timestamps=timestamps)
    except ConfigError:
        # The command reports it (in one line) when it reads its settings; --help still works.
        setup_logging(verbose=bool(verbose), timestamps=bool(timestamps))
        return
    # A worker child (``consume`` supervises one) reads its settings from the environment.
    os.environ["STOCKFLOW_VERBOSE"] = "true" if s.verbose else "false"
    os.environ["STOCKFLOW_LOG_TIMESTAMPS"] = "true" if s.log_timestamps else "false"
    _secrets[:] = s.secrets()
    setup_logging(verbose=s.verbose, timestamps=s.log_timestamps, secrets=_secrets)


_secrets: list[str] = []
"""The service passwords of this run: never printed (see ``main``)."""


# --- stack ---
def _report(line: str) -> None:
    err.print(f"[dim]{line}[/dim]")


def _stack_up(s: Settings) -> None:
    from stockflow.stack import Stack

    with err.status("Bringing the local stack up...", spinner="dots"):
        results = Stack(s).up(_report)
    for r in results:
        pid = f" (pid {r.pid})" if r.pid else ""
        err.print(f"[green]✓[/green] {r.name}: {r.action}{pid} — {r.version}")


@stack_app.command("up")
def stack_up(
    brokers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=9,
            help="Kafka nodes: 3 starts a KRaft cluster on loopback, topics then replicated "
            "3 times [default: STOCKFLOW_KAFKA_BROKERS, 1].",
        ),
    ] = None,
) -> None:
    """Provision (cached), start and wait for every service not set by the environment.

    Idempotent: services already running are left alone.
    """
    _stack_up(settings(kafka_brokers=brokers))


@stack_app.command("down")
def stack_down() -> None:
    """Stop the services `stack up` started; services of the user's own are never touched."""
    from stockflow.stack import Stack

    for r in Stack(settings()).down():
        console.print(f"{r.name}: {r.action}")


@stack_app.command("status")
def stack_status() -> None:
    """Show each service: where it is, whether it answers, its version and pid.

    Exits 1 when any service does not answer.
    """
    from stockflow.stack import Stack

    rows = Stack(settings()).status()
    table = Table("service", "mode", "address", "state", "version", "pid")
    for row in rows:
        # A service with a live process that does not answer (hung, or its storage hung).
        dead = "[red]down[/red]" if row.pid is None else "[red]not answering[/red]"
        state = "[green]up[/green]" if row.running else dead
        table.add_row(
            row.name, row.mode, row.address, state, row.version or "-", str(row.pid or "-")
        )
    console.print(table)
    if not all(row.running for row in rows):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[
        str | None,
        typer.Argument(help="kafka (every node), kafka-N (one node), ferretdb or redis"),
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show of each.")] = 0,
) -> None:
    """Show where each local service writes its log (and, with -n, the last lines)."""
    from stockflow.stack import Stack
    from stockflow.stack.process import tail

    for row in Stack(settings()).status():
        if service and service not in (row.name, row.name.split("-")[0]):
            continue
        for path in row.logs:
            console.print(f"{row.name}: {path}")
            if lines:
                console.print(tail(path, lines), markup=False, highlight=False)


@stack_app.command("env")
def stack_env() -> None:
    """Print `export` lines for the three services: eval "$(stockflow stack env)"."""
    from stockflow.stack import Stack

    for line in Stack(settings()).env_lines():
        print(line)


# --- topics ---
@topics_app.command("create")
def topics_create(
    name: Annotated[str, typer.Argument(help="Topic name.")],
    partitions: Annotated[int, typer.Option(min=1, help="Number of partitions.")] = 1,
    replication: Annotated[
        int | None,
        typer.Option(
            min=1, help="Replication factor [default: min(3, brokers), min.insync.replicas 2 at 3]."
        ),
    ] = None,
) -> None:
    """Create a topic (no error if it exists already)."""
    from stockflow.topics import create_topic

    created = create_topic(settings(), name, partitions=partitions, replication=replication)
    console.print(f"{name}: {'created' if created else 'already exists'}")


@topics_app.command("list")
def topics_list() -> None:
    """List topics with their partition count and replication factor."""
    from stockflow.topics import list_topics

    table = Table("topic", "partitions", "replication")
    for topic in list_topics(settings()):
        table.add_row(topic.name, str(topic.partitions), str(topic.replication))
    console.print(table)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@topics_app.command("describe")
def topics_describe(
    name: Annotated[str, typer.Argument(help="Topic name.")], as_json: JsonOpt = False
) -> None:
    """Show a topic's partitions: leader, replicas, in-sync replicas and end offset."""
    from dataclasses import asdict

    from stockflow.topics import describe_topic

    topic = describe_topic(settings(), name)
    if as_json:
        print(json.dumps(asdict(topic), indent=2))
        return
    console.print(
        f"topic {topic.name} (id {topic.topic_id or '-'}): {len(topic.partitions)} partition(s)"
    )
    table = Table("partition", "leader", "replicas", "in-sync", "end offset")
    for p in topic.partitions:
        table.add_row(
            str(p.partition),
            "-" if p.leader is None else str(p.leader),
            ",".join(map(str, p.replicas)),
            ",".join(map(str, p.in_sync)),
            str(p.end_offset),
        )
    console.print(table)


@app.command("groups")
def groups(
    group: Annotated[
        str | None,
        typer.Argument(help="The pipeline's group (the appliers') [default: STOCKFLOW_GROUP_ID]."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show both stages' consumer groups (GROUP-router and GROUP): members, their assigned
    partitions, and per partition the committed offset, end offset and lag."""
    from dataclasses import asdict

    from stockflow.groups import pipeline_groups

    found = pipeline_groups(settings(), group)
    if as_json:
        print(json.dumps([{**asdict(g), "lag": g.lag} for g in found], indent=2))
        return
    for g in found:
        console.print(
            f"[bold]{g.group_id}[/bold] ({g.stage} stage): {g.state}, {len(g.members)} member(s), "
            f"coordinator {g.coordinator if g.coordinator is not None else '-'}, lag {g.lag}"
        )
        members = Table("client id", "host", "member id", "assigned")
        for m in g.members:
            assigned = ", ".join(f"{t}[{p}]" for t, p in m.assignment) or "-"
            members.add_row(m.client_id, m.host, m.member_id, assigned)
        if g.members:
            console.print(members)
        table = Table("topic", "partition", "committed", "end offset", "lag", "owner")
        for row in g.partitions:
            table.add_row(
                row.topic,
                str(row.partition),
                "-" if row.committed is None else str(row.committed),
                str(row.end_offset),
                str(row.lag),
                row.owner or "-",
            )
        console.print(table)


# --- products ---
@products_app.command("seed")
def products_seed() -> None:
    """Create the demo products (101 with stock 100, 102-105) or reset them to that stock.

    Other products are left alone.
    """
    from stockflow.inventory import DEMO_PRODUCTS
    from stockflow.pipeline import open_pipeline

    with open_pipeline(settings()) as pipeline:
        pipeline.inventory.seed(DEMO_PRODUCTS)
        for pid in DEMO_PRODUCTS:
            pipeline.cache.invalidate(pid)
    for pid, stock in DEMO_PRODUCTS.items():
        console.print(f"product {pid}: stock {stock}")


@products_app.command("list")
def products_list(
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
) -> None:
    """List products and their stock, straight from MongoDB."""
    from stockflow.pipeline import open_pipeline

    with open_pipeline(settings()) as pipeline:
        table = Table("product_id", "stock")
        for product in pipeline.inventory.list_products(limit):
            table.add_row(str(product.get("product_id")), str(product.get("stock")))
    console.print(table)


# --- produce / consume ---
def _read_lines(source: Path) -> Iterator[str]:
    handle = sys.stdin if str(source) == "-" else source.open(encoding="utf-8", errors="replace")
    with handle:
        for line in handle:
            if line.strip():
                yield line.strip()


@app.command()
def produce(
    orders: Annotated[
        list[str] | None,
        typer.Argument(help='Orders as JSON: \'{"orderId":1,"productId":101,"quantity":1}\''),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="JSON-lines file of orders; - for stdin.")
    ] = None,
    topic: TopicOpt = None,
    raw: Annotated[
        bool, typer.Option(help="Send the lines as they are, without validating them.")
    ] = False,
    partitioner: Annotated[
        str | None,
        typer.Option(
            help="Where orders go: product (key = productId, the default), partition (all to "
            "--partition N), round-robin, customer (key = customerId, else productId) or "
            "broadcast (each to every --partitions 0,2,5 or all). Prints each order's partition.",
        ),
    ] = None,
    partition: Annotated[
        int | None, typer.Option(help="The partition of --partitioner partition.")
    ] = None,
    partitions: Annotated[
        str | None,
        typer.Option(help="The partitions of --partitioner broadcast: 0,2,5 or all."),
    ] = None,
) -> None:
    """Publish orders with delivery reports; exits 1 if any order is invalid or undelivered."""
    from stockflow.orders import decode_order
    from stockflow.partitioning import make_partitioner
    from stockflow.producer import OrderProducer

    lines = list(orders or [])
    if file is not None:
        lines.extend(_read_lines(file))
    if not lines:
        raise typer.BadParameter("give orders as arguments or with --file")
    if raw and partitioner is not None:
        raise typer.BadParameter("--raw sends lines unread; --partitioner needs valid orders")
    strategy = make_partitioner(
        partitioner or "product", partition=partition, partitions=partitions
    )
    from stockflow.topics import require_topic

    s = settings(topic=topic)
    require_topic(s, s.topic)
    invalid = 0
    placed: dict[int, tuple[int | str, list[int]]] = {}
    with OrderProducer(s, partitioner=strategy) as producer:
        for number, line in enumerate(lines, 1):
            if raw:
                producer.send_raw(line.encode())
                continue
            try:
                # The limits the worker applies, so what is sent is what the worker accepts.
                limits = {"max_bytes": s.max_message_bytes, "max_quantity": s.max_quantity}
                order = decode_order(line.encode(), **limits)
            except InvalidOrderError as exc:
                invalid += 1
                err.print(f"[red]order {number} not sent:[/red] {exc.reason}")
                continue
            placed[number] = (order.order_id, [])
            producer.send(order, on_partition=placed[number][1].append)
        report = producer.flush()
    if partitioner is not None:
        for number, (order_id, where) in placed.items():
            listed = ", ".join(map(str, sorted(where))) or "not delivered"
            word = "partitions" if len(where) > 1 else "partition"
            console.print(f"order {number} (orderId {order_id}) -> {word} {listed}")
    console.print(
        f"{report.delivered} delivered to {s.topic}, {report.failed} failed, {invalid} invalid"
    )
    if report.failed or invalid:
        raise typer.Exit(1)


@app.command()
def consume(
    topic: TopicOpt = None,
    group: Annotated[
        str | None,
        typer.Option("--group", "-g", help="Consumer group [default: STOCKFLOW_GROUP_ID]"),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(min=0.1, help="Exit once no message came for this many seconds."),
    ] = None,
    max_messages: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Exit once this many messages were handled (each stage counts its own; the "
            "batch in hand is finished first).",
        ),
    ] = None,
    role: Annotated[
        str, typer.Option(help="router, applier or both (the two stages of one worker).")
    ] = "both",
    quiet: Annotated[bool, typer.Option(help="No per-order lines, only warnings.")] = False,
    supervise: Annotated[
        bool,
        typer.Option(
            help="Run the worker as a child process and restart it if it dies or stops for a "
            "transient cause (exit 75); --no-supervise runs it in this process."
        ),
    ] = True,
    stats_file: Annotated[
        Path | None,
        typer.Option(help="At exit, write what the worker did (counts, seconds per step) as JSON."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes to run under this supervisor, each a member of the "
            "consumer groups (Kafka spreads the partitions over them); each is restarted on "
            "its own; --max-messages then counts for each.",
        ),
    ] = 1,
    supervisor_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run a worker: route the topic's orders by product, apply them to stock exactly once.

    Prints the seed's lines per order. Runs until SIGINT or SIGTERM, which finish or abandon
    the batch in hand safely (nothing is lost: an abandoned batch is redone by the next owner).
    Exit status: 0 done, 1 an error it explains, 75 a transient cause (a service unreachable),
    78 a configuration error.
    """
    roles = ("router", "applier") if role == "both" else (role,)
    if not set(roles) <= {"router", "applier"}:
        raise typer.BadParameter("--role is router, applier or both")
    s = settings(topic=topic, group_id=group)  # a configuration error stops here, once
    if workers > 1 and not supervise:
        raise typer.BadParameter("--workers N runs N processes under a supervisor")
    if workers > 1 and stats_file is not None:
        raise typer.BadParameter("--stats-file is for one worker (each would overwrite it)")
    if supervise:
        from stockflow.supervisor import supervise as run_supervised

        args = ["--role", role] + (["--quiet"] if quiet else [])
        args += ["--topic", topic] if topic else []
        args += ["--group", group] if group else []
        args += ["--idle-timeout", str(idle_timeout)] if idle_timeout is not None else []
        args += ["--max-messages", str(max_messages)] if max_messages is not None else []
        args += ["--stats-file", str(stats_file)] if stats_file is not None else []
        say = lambda line: err.print(f"[yellow]{escape(line)}[/yellow]")  # noqa: E731
        raise typer.Exit(run_supervised(args, say=say, workers=workers))
    if supervisor_pid is not None:
        from stockflow.supervisor import die_with_parent

        die_with_parent(supervisor_pid)
    if quiet:
        logging.getLogger("stockflow.orders").setLevel(logging.WARNING)
    try:
        stats = _work(s, roles, idle_timeout, max_messages)
    except Exception as exc:
        from stockflow.supervisor import exit_for

        found = exit_for(exc)
        if found is None:
            raise
        # A service away (the supervisor starts afresh) or refusing the credentials (78).
        status, line = found
        _fail(f"worker stopped: {line}", status)
    err.print(f"[dim]{stats.summary()}[/dim]")
    if stats_file is not None:
        stats_file.write_text(json.dumps(stats.as_dict(), indent=2) + "\n")


def _work(
    s: Settings, roles: tuple[str, ...], idle_timeout: float | None, max_messages: int | None
) -> WorkerStats:
    from stockflow.pipeline import open_pipeline
    from stockflow.worker import Worker

    with open_pipeline(s) as pipeline:
        worker = Worker(s, pipeline, roles=roles)

        def on_signal(signum: int, _: object) -> None:
            err.print(f"[yellow]{signal.Signals(signum).name}: stopping after this batch[/yellow]")
            worker.stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        err.print(
            f"[dim]Consuming {s.topic} ({'+'.join(roles)}, group {s.group_id}); "
            "Ctrl-C to stop[/dim]"
        )
        # What is alive now (modules, clients, settings: most of the heap) lives as long as the
        # process. Left to the cycle collector, each of its full passes walked all of it with
        # both stages stopped (50-90 ms, every few seconds at 1,000 orders/s); frozen, a full
        # pass walks only what the batches allocate.
        gc.freeze()
        return worker.run(idle_timeout=idle_timeout, max_messages=max_messages)


@app.command()
def demo(
    stack: Annotated[
        bool, typer.Option(help="Bring the local stack up first (skipped for services set by env).")
    ] = True,
) -> None:
    """Run the seed's story: seed products, consume, send orders 1 and 3 and one beyond stock.

    Resets only the demo's products; prints the seed's lines and the final stock (100 -> 99 -> 96).
    """
    from stockflow.demo import run_demo

    s = settings()
    if stack:
        _stack_up(s)
    result = run_demo(s, lambda line: console.print(f"[bold]{line}[/bold]"))
    if result.stocks != [100, 99, 96, 96]:  # the story itself is the check
        raise StockflowError(f"unexpected stock sequence {result.stocks}")


def _fail(message: str, status: int) -> None:
    from stockflow.logs import scrub

    err.print(f"[red]error:[/red] {escape(scrub(message, _secrets))}", highlight=False)
    sys.exit(status)


def main() -> None:
    """Entry point: an error becomes one line (no traceback, no secret) and a non-zero exit:
    EXIT_CONFIG for settings stockflow cannot use, 1 for any other."""
    import stockflow.cli_ops  # noqa: F401  (registers the operator commands)

    try:
        app()
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except StockflowError as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # a bug, or a library error nobody turned into a message
        import traceback

        from stockflow.logs import scrub

        if os.environ.get("STOCKFLOW_VERBOSE") == "true":
            err.print(scrub(traceback.format_exc(), _secrets), markup=False, highlight=False)
        _fail(f"{type(exc).__name__}: {exc} (-v shows where)", 1)
