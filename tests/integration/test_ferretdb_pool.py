"""FerretDB under concurrent multi-statement updates: no pool size deadlocks it.

stockflow writes stock in unordered ``update`` commands of ``CHUNK`` statements, 8 side by
side (``Inventory.write_changes``). Stock FerretDB v1 held a pooled PostgreSQL connection for
every statement of a command until the command ended, and took another for each write: enough
concurrent commands held the whole pool and waited on each other for ever (the shared stack
stopped answering with ``pool_max_conns=180``). The local build fixes that
(``POOL_PATCHES`` in ``stack/ferretdb_patches.py``): a command holds at most one connection at
a time and never waits for a second while holding one.

These tests run a private PostgreSQL and FerretDB (``stockflow.testing.PrivateDatabase``)
whose pool (``POOL``) is smaller than the number of writers, so commands always queue for
connections: a command that held one while waiting for another would deadlock them all. The
build before the fix is run too when it is in the build cache, to show the deadlock the others
prove absent.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from pymongo import MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from stockflow.ledger import CHUNK
from stockflow.stack.ferretdb import FerretDBService
from stockflow.stack.ferretdb_patches import BUILD, WITHOUT_POOL_FIX, Build
from stockflow.testing import PrivateDatabase

Doc = dict[str, Any]

POOL = 4
"""FerretDB's pool_max_conns here: half the writers, a quarter of a command's statements."""
WRITERS = 8
COMMANDS = 8
"""Update commands of CHUNK statements per writer."""
START = 1000
NO_PROGRESS_MS = 25_000
"""A command that has not answered after this long is taken as stuck (each takes well under a
second on this workload, even on a loaded machine)."""


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDatabase]:
    """A private PostgreSQL, shared by the module's FerretDBs (POOL connections each)."""
    if os.environ.get("MONGODB_URI"):
        pytest.skip("MONGODB_URI is set: this test needs the local FerretDB build")
    private = PrivateDatabase(
        tmp_path_factory.mktemp("pool") / "state", ferretdb_pool_max_conns=POOL
    )
    try:
        private.start_postgres()
        yield private
    finally:
        private.down()


@contextmanager
def ferretdb(database: PrivateDatabase, build: Build) -> Iterator[str]:
    """FerretDB of ``build`` over the private PostgreSQL; yields its URL, kills it afterwards.

    Killed, not stopped: a deadlocked FerretDB does not finish a graceful shutdown.
    """
    database.start_ferretdb(build)
    try:
        yield database.url
    finally:
        database.kill_ferretdb()


@dataclass
class Run:
    """What the writers did: commands answered, and the first error of each writer that failed."""

    answered: int = 0
    errors: list[BaseException] = field(default_factory=list)
    seconds: float = 0.0


def run_writers(
    url: str, database: str, command: Callable[[Collection[Doc], int, int], None]
) -> Run:
    """WRITERS threads, each with its own client, each sending ``command(col, writer, n)`` for
    n in range(COMMANDS); a command not answered within NO_PROGRESS_MS ends its writer."""
    run = Run()
    lock = threading.Lock()
    barrier = threading.Barrier(WRITERS)

    def writer(w: int) -> None:
        client: MongoClient[Doc] = MongoClient(url, timeoutMS=NO_PROGRESS_MS)
        try:
            col = client[database]["products"]
            barrier.wait()
            for n in range(COMMANDS):
                command(col, w, n)
                with lock:
                    run.answered += 1
        except BaseException as exc:
            with lock:
                run.errors.append(exc)
        finally:
            client.close()

    began = time.monotonic()
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(NO_PROGRESS_MS / 1000 * COMMANDS + 30)
    run.seconds = time.monotonic() - began
    return run


def _seed(url: str, database: str, ids: range) -> None:
    client: MongoClient[Doc] = MongoClient(url, timeoutMS=NO_PROGRESS_MS)
    try:
        client[database]["products"].insert_many([{"_id": i, "stock": START} for i in ids])
    finally:
        client.close()


def _stocks(url: str, database: str) -> dict[int, int]:
    client: MongoClient[Doc] = MongoClient(url, timeoutMS=NO_PROGRESS_MS)
    try:
        return {d["_id"]: d["stock"] for d in client[database]["products"].find({})}
    finally:
        client.close()


def _own_products(writer: int) -> range:
    return range(writer * CHUNK, (writer + 1) * CHUNK)


def _compare_and_set_own(col: Collection[Doc], writer: int, n: int) -> None:
    """stockflow's write: one command decrementing the writer's own CHUNK products, each
    conditional on the stock it had (the writer is the only one to change them)."""
    ops = [
        UpdateOne({"_id": p, "stock": START - n}, {"$set": {"stock": START - n - 1}})
        for p in _own_products(writer)
    ]
    result = col.bulk_write(ops, ordered=False)
    assert result.matched_count == CHUNK, (writer, n, result.bulk_api_result)


def test_concurrent_bulk_updates_complete_on_a_pool_smaller_than_the_writers(
    database: PrivateDatabase,
) -> None:
    """8 writers, each sending commands of CHUNK compare-and-set updates on its own products,
    over POOL connections: every command answers and every decrement is in the stock.

    Seen failing on the build before the fix (stockflow3): no command answered in 25 s.
    """
    with ferretdb(database, BUILD) as url:
        database = f"pool_{uuid.uuid4().hex[:10]}"
        _seed(url, database, range(WRITERS * CHUNK))
        run = run_writers(url, database, _compare_and_set_own)
        assert run.errors == [], f"{len(run.errors)} writers stuck: {run.errors[0]!r}"
        stocks = _stocks(url, database)

    assert run.answered == WRITERS * COMMANDS
    assert stocks == dict.fromkeys(range(WRITERS * CHUNK), START - COMMANDS)


def test_contended_bulk_increments_complete_and_lose_nothing(database: PrivateDatabase) -> None:
    """All 8 writers ``$inc`` the same CHUNK products, CHUNK statements a command: lost races
    make the compare-and-set patch read documents again, each read a query of its own, on a
    pool smaller than the writers. Nothing waits for ever and no increment is lost."""

    def inc_shared(col: Collection[Doc], writer: int, n: int) -> None:
        ops = [UpdateOne({"_id": p}, {"$inc": {"stock": -1}}) for p in range(CHUNK)]
        result = col.bulk_write(ops, ordered=False)
        assert result.modified_count == CHUNK, (writer, n, result.bulk_api_result)

    with ferretdb(database, BUILD) as url:
        database = f"pool_{uuid.uuid4().hex[:10]}"
        _seed(url, database, range(CHUNK))
        run = run_writers(url, database, inc_shared)
        assert run.errors == [], f"{len(run.errors)} writers stuck: {run.errors[0]!r}"
        stocks = _stocks(url, database)

    assert run.answered == WRITERS * COMMANDS
    assert stocks == dict.fromkeys(range(CHUNK), START - WRITERS * COMMANDS)


@pytest.mark.timeout(120)
def test_the_build_before_the_fix_deadlocks(database: PrivateDatabase) -> None:
    """The first test's writers on the build before POOL_PATCHES: no command answers in
    NO_PROGRESS_MS, and then a read from another client does not answer either.

    Skipped when that build is not in the build cache (it is never built for this test).
    """
    if not FerretDBService(database.settings, WITHOUT_POOL_FIX).binary.exists():
        pytest.skip(f"FerretDB build {WITHOUT_POOL_FIX.tag} is not in the build cache")
    with ferretdb(database, WITHOUT_POOL_FIX) as url:
        database = f"pool_{uuid.uuid4().hex[:10]}"
        _seed(url, database, range(WRITERS * CHUNK))
        run = run_writers(url, database, _compare_and_set_own)
        reader: MongoClient[Doc] = MongoClient(url, timeoutMS=2000)
        try:
            with pytest.raises(PyMongoError) as read:
                reader[database]["products"].find_one({"_id": 0})
        finally:
            reader.close()

    assert run.answered < WRITERS * COMMANDS, f"no deadlock: all answered in {run.seconds:.0f}s"
    assert len(run.errors) == WRITERS
    assert all(isinstance(e, PyMongoError) and e.timeout for e in run.errors), run.errors
    assert read.value.timeout, read.value
