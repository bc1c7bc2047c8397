"""Paused workers (zombies) at size (``STOCKFLOW_CHAOS_SCALE`` of it in ``make test``).

Three ``stockflow consume`` processes work on a stream of orders (with restocks and malformed
messages) while, one after the other, each is frozen with SIGSTOP and continued with SIGCONT.
Four pauses are longer than the group session and transaction timeouts (10 s each): the frozen
worker's partitions go to the others and it wakes up a zombie, holding whatever batch it was
in. Two of those land exactly between reading a batch's products and writing them (the
worker is run through ``tests/integration/paused_worker.py``, which stops itself there when
asked); the other two, and one short pause the group does not notice, land wherever the
worker happens to be. A woken zombie's product writes must be refused by the compare-and-set
and its Kafka transaction fenced; however the pauses land, every message gets exactly one
outcome and the books balance.

Only the test's own worker processes are stopped, never a service: safe on a shared stack.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from stockflow.config import Settings
from stockflow.errors import StockflowError
from stockflow.groups import describe_group
from tests.chaos.harness import Workers, run_chaos

SCALE = float(os.environ.get("STOCKFLOW_CHAOS_SCALE", "0.1"))
# Short version in make test: tests/integration/test_zombie.py (pauses here last 13-16 s each).
pytestmark = [pytest.mark.chaos, pytest.mark.full_size_only, pytest.mark.timeout(1800)]

PAUSED = Path(__file__).parents[1] / "integration" / "paused_worker.py"
LONG = (13.0, 16.0)
"""Seconds of a long pause: past the session timeout and the transaction timeout (10 s each),
under the deadline of a Kafka call the worker may be frozen in (``kafka_timeout`` 10 s + 10)."""
SHORT = 3.0
GAP = 6.0
"""Seconds at least between pauses: the woken worker rejoins, the group settles."""
REFUSED = re.compile(r"applier: (\d+) of \d+ product\(s\) changed under this writer, refused")
FENCED = re.compile(
    r"(applier|router): (?:transaction failed \(.*(?:Unknown member|[Ii]llegal generation)"
    r"|abort failed: .*fenced)"
)


@dataclass(frozen=True)
class Pause:
    seconds: float
    mid_batch: bool
    """Between reading a batch's products and writing them; else wherever the worker is."""


def members(s: Settings) -> int | None:
    try:
        return len(describe_group(s, s.group_id).members)
    except StockflowError:
        return None


def stopped(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "T"
    except (OSError, IndexError):
        return False


def freeze(proc: subprocess.Popen[bytes], trigger: Path, mid_batch: bool) -> bool:
    """Stop ``proc``: at its next product write if ``mid_batch`` (True if it got there within
    20 s), else at once (and then, or on a time-out, False)."""
    if mid_batch:
        trigger.touch()
        until = time.monotonic() + 20
        while time.monotonic() < until:
            if stopped(proc):
                return True
            time.sleep(0.05)
        trigger.unlink(missing_ok=True)
    os.kill(proc.pid, signal.SIGSTOP)
    return False


@dataclass
class Seen:
    """What one pause did."""

    mid_batch: bool
    """It landed between reading a batch's products and writing them."""
    members: int
    """Applier-group members before it."""
    fewest: int | None = None
    """The fewest members Kafka reported while it lasted."""
    lost_after: float | None = None
    """Seconds into it when the group had dropped the frozen worker."""


def pauses(
    plan: list[Pause], log_dir: Path, seen: list[Seen]
) -> Callable[[Settings, Workers, random.Random, list[str]], None]:
    """Freeze the pool's workers in turn, one ``plan`` entry each."""

    def inject(s: Settings, pool: Workers, rng: random.Random, faults: list[str]) -> None:
        began = time.monotonic()
        time.sleep(8)  # the workers joined and are at work
        for turn, pause in enumerate(plan):
            alive = [p for p in pool.procs if p.poll() is None]
            victim = alive[turn % len(alive)]
            at = time.monotonic() - began
            before = members(s) or len(alive)
            this = Seen(freeze(victim, log_dir / f"freeze-{victim.pid}", pause.mid_batch), before)
            frozen_at = time.monotonic()
            try:
                while time.monotonic() - frozen_at < pause.seconds:
                    time.sleep(0.25)
                    count = members(s)
                    if count is None or (this.fewest is not None and count >= this.fewest):
                        continue
                    this.fewest = count
                    if count < before and this.lost_after is None:
                        this.lost_after = time.monotonic() - frozen_at
            finally:
                os.kill(victim.pid, signal.SIGCONT)
            seen.append(this)
            faults.append(
                f"worker {pool.procs.index(victim)} paused {pause.seconds:.1f}s at {at:.0f}s, "
                f"{'between reading and writing products' if this.mid_batch else 'anywhere'}"
                + (
                    f", dropped by the group after {this.lost_after:.1f}s"
                    if this.lost_after
                    else ""
                )
            )
            time.sleep(GAP + rng.uniform(0, 2))

    return inject


def test_workers_paused_past_their_session_and_resumed_write_and_commit_nothing_stale(
    base: Settings, tmp_path: Path
) -> None:
    rng = random.Random(5)
    plan = [
        Pause(rng.uniform(*LONG), mid_batch=True),
        Pause(SHORT, mid_batch=False),  # the group does not notice
        Pause(rng.uniform(*LONG), mid_batch=False),
        Pause(rng.uniform(*LONG), mid_batch=True),
        Pause(rng.uniform(*LONG), mid_batch=False),
    ]
    orders = max(500, int(20_000 * SCALE))
    seconds = 8 + sum(p.seconds for p in plan) + len(plan) * (GAP + 1)
    seen: list[Seen] = []
    result = run_chaos(
        base,
        "paused-workers",
        orders=orders,
        workers=3,
        faults=pauses(plan, tmp_path, seen),
        rate=orders / seconds,  # orders flow through every pause
        log_dir=tmp_path,
        program=[sys.executable, str(PAUSED), str(tmp_path / "freeze-{pid}"), "--"],
    )
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("worker-*.log")))
    refused = sum(int(n) for n in REFUSED.findall(logs))
    fenced = Counter(FENCED.findall(logs))
    line = (
        f"{result.line()}; product writes refused by the compare-and-set: {refused}; "
        f"transactions fenced: {dict(fenced)}"
    )
    print(line)
    with Path(os.environ.get("STOCKFLOW_CHAOS_LOG", "/dev/null")).open("a") as out:
        out.write(line + "\n")
    assert result.report is not None
    assert result.report.discrepancies == 0, result.report
    assert result.report.messages_checked == result.orders + result.restocks + result.malformed
    assert result.negative == 0
    assert result.stale_cache == 0
    assert result.ledger_mismatches == [], result.ledger_mismatches[:10]
    # Each long pause cost the frozen worker its membership, the short one did not; the
    # pauses between reading and writing ended in refused writes and fenced transactions.
    assert [s.lost_after is not None for s in seen] == [p.seconds > SHORT for p in plan], seen
    assert [s.mid_batch for s in seen] == [p.mid_batch for p in plan], seen
    assert refused >= 2 and fenced["applier"] >= 2, line
