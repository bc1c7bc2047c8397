"""The ``stockflow`` command line: thin over the modules it calls."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stockflow.config import Settings, load_settings
from stockflow.errors import ConfigError, InvalidOrderError, StockflowError

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
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"invalid settings:\n{exc}") from None


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    timestamps: Annotated[bool, typer.Option(help="Prefix log lines with the time.")] = False,
) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if timestamps else "%(message)s"
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stdout
    )
    for noisy in ("pymongo", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
def stack_up() -> None:
    """Provision (cached), start and wait for every service not set by the environment.

    Idempotent: services already running are left alone.
    """
    _stack_up(settings())


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
        state = "[green]up[/green]" if row.running else "[red]down[/red]"
        table.add_row(
            row.name, row.mode, row.address, state, row.version or "-", str(row.pid or "-")
        )
    console.print(table)
    if not all(row.running for row in rows):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str | None, typer.Argument(help="kafka, ferretdb or redis")] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines to show of each.")] = 0,
) -> None:
    """Show where each local service writes its log (and, with -n, the last lines)."""
    from stockflow.stack import Stack
    from stockflow.stack.process import tail

    for row in Stack(settings()).status():
        if service and row.name != service:
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
    replication: Annotated[int, typer.Option(min=1, help="Replication factor.")] = 1,
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
) -> None:
    """Publish orders with delivery reports; exits 1 if any order is invalid or undelivered."""
    from stockflow.orders import decode_order
    from stockflow.producer import OrderProducer

    lines = list(orders or [])
    if file is not None:
        lines.extend(_read_lines(file))
    if not lines:
        raise typer.BadParameter("give orders as arguments or with --file")
    from stockflow.topics import require_topic

    s = settings(topic=topic)
    require_topic(s, s.topic)
    invalid = 0
    with OrderProducer(s) as producer:
        for number, line in enumerate(lines, 1):
            if raw:
                producer.send_raw(line.encode())
                continue
            try:
                # The limits the worker applies, so what is sent is what the worker accepts.
                limits = {"max_bytes": s.max_message_bytes, "max_quantity": s.max_quantity}
                producer.send(decode_order(line.encode(), **limits))
            except InvalidOrderError as exc:
                invalid += 1
                err.print(f"[red]order {number} not sent:[/red] {exc.reason}")
        report = producer.flush()
    console.print(
        f"{report.delivered} delivered to {s.topic}, {report.failed} failed, {invalid} invalid"
    )
    if report.failed or invalid:
        raise typer.Exit(1)


def _supervise(args: list[str]) -> int:
    """Run ``consume --no-supervise ARGS`` and restart it after a crash or a hang."""
    import subprocess

    from stockflow.retry import Backoff
    from stockflow.watchdog import EXIT_STUCK

    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    backoff = Backoff(base=1.0, cap=30.0)
    while True:
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "stockflow", "consume", "--no-supervise", *args]
        )
        code = child.wait()
        # Restart after a hang (75) or a death by signal (OOM killer, kill -9); any other
        # status is the worker's own verdict (0: done, 1: a clear error) and is passed on.
        if stopping or (code != EXIT_STUCK and code >= 0):
            return code
        if time.monotonic() - started > 60:
            backoff.reset()
        delay = backoff.next_delay()
        err.print(f"[yellow]worker exited with status {code}; restarting in {delay:.1f}s[/yellow]")
        time.sleep(delay)


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
    role: Annotated[
        str, typer.Option(help="router, applier or both (the two stages of one worker).")
    ] = "both",
    quiet: Annotated[bool, typer.Option(help="No per-order lines, only warnings.")] = False,
    supervise: Annotated[
        bool,
        typer.Option(
            help="Run the worker as a child process and restart it if it dies or hangs "
            "(exit 75); --no-supervise runs it in this process."
        ),
    ] = True,
    stats_file: Annotated[
        Path | None,
        typer.Option(help="At exit, write what the worker did (counts, seconds per step) as JSON."),
    ] = None,
) -> None:
    """Run a worker: route the topic's orders by product, apply them to stock exactly once.

    Prints the seed's lines per order. Runs until SIGINT or SIGTERM, which finish or abandon
    the batch in hand safely (nothing is lost: an abandoned batch is redone by the next owner).
    """
    from stockflow.pipeline import open_pipeline
    from stockflow.worker import Worker

    if supervise:
        args = ["--role", role] + (["--quiet"] if quiet else [])
        args += ["--topic", topic] if topic else []
        args += ["--group", group] if group else []
        args += ["--idle-timeout", str(idle_timeout)] if idle_timeout is not None else []
        args += ["--stats-file", str(stats_file)] if stats_file is not None else []
        raise typer.Exit(_supervise(args))
    roles = ("router", "applier") if role == "both" else (role,)
    if not set(roles) <= {"router", "applier"}:
        raise typer.BadParameter("--role is router, applier or both")
    if quiet:
        logging.getLogger("stockflow.orders").setLevel(logging.WARNING)
    s = settings(topic=topic, group_id=group)
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
        stats = worker.run(idle_timeout=idle_timeout)
    err.print(f"[dim]{stats.summary()}[/dim]")
    if stats_file is not None:
        stats_file.write_text(json.dumps(stats.as_dict(), indent=2) + "\n")


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


def main() -> None:
    """Entry point: StockflowError becomes a one-line message and exit status 1."""
    import stockflow.cli_ops  # noqa: F401  (registers the operator commands)

    try:
        app()
    except StockflowError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(1)
