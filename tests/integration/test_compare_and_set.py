"""The database fences a stale writer: concurrent conditional updates of one document.

stockflow changes a product with a compare-and-set (``Inventory.write_changes``: an update
whose filter holds the stock and marker it read). That is only safe if the server decides the
condition and the write as one step. MongoDB does; FerretDB v1 reads, changes in Go and writes
back by ``_id`` (its issue #3040), so the local stack runs it with stockflow's patch
(``stack/ferretdb_patches.py``, ``CAS_PATCHES``). These tests race many writers on the same
documents and count: every update reported as matched must be in the final document.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo import MongoClient, ReturnDocument, UpdateOne
from pymongo.collection import Collection

from stockflow.config import Settings
from stockflow.ledger import chunks
from stockflow.planner import MARKER

Doc = dict[str, Any]

WRITERS = 8
PER_WRITER = 200
START = 1000


@pytest.fixture
def products(stack_settings: Settings) -> Iterator[Collection[Doc]]:
    """A fresh collection in a database of its own, dropped afterwards."""
    client: MongoClient[Doc] = MongoClient(stack_settings.mongodb_url)
    database = f"stockflow_test_cas_{uuid.uuid4().hex[:10]}"
    try:
        yield client[database]["products"]
    finally:
        client.drop_database(database)
        client.close()


def race(url: str, products: Collection[Doc], work: Callable[[Collection[Doc], int], int]) -> int:
    """Run ``work(products, writer)`` in WRITERS threads, each with its own client; sum results."""
    results = [0] * WRITERS
    errors: list[BaseException] = []
    barrier = threading.Barrier(WRITERS)

    def run(writer: int) -> None:
        client: MongoClient[Doc] = MongoClient(url)
        try:
            barrier.wait()
            col = client[products.database.name][products.name]
            results[writer] = work(col, writer)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return sum(results)


def test_compare_and_set_writers_of_one_product_lose_no_update(
    stack_settings: Settings, products: Collection[Doc]
) -> None:
    """8 writers x 200 increments, each a read then ``update_one`` conditional on what was read.

    A writer retries when its update matched nothing (another writer got there first). On an
    unpatched FerretDB v1 two writers of the same read both match, and one increment is lost.
    """
    products.insert_one({"_id": "p1", "product_id": 1, "stock": START})

    def work(col: Collection[Doc], writer: int) -> int:
        done = attempts = 0
        while done < PER_WRITER:
            attempts += 1
            doc = col.find_one({"_id": "p1"})
            assert doc is not None
            last = doc.get(MARKER, {}).get("last")
            condition = {"$exists": False} if last is None else last
            result = col.update_one(
                {"_id": "p1", "stock": doc["stock"], f"{MARKER}.last": condition},
                {"$set": {"stock": doc["stock"] + 1, MARKER: {"last": writer * 10**6 + done}}},
            )
            assert result.matched_count in (0, 1)
            done += result.matched_count
            assert attempts < 100 * PER_WRITER, "no progress"
        return done

    applied = race(stack_settings.mongodb_url, products, work)

    final = products.find_one({"_id": "p1"})
    assert final is not None
    lost = START + applied - final["stock"]
    assert lost == 0, f"{lost} of {applied} matched updates lost"


def test_concurrent_increments_of_one_product_are_all_kept(
    stack_settings: Settings, products: Collection[Doc]
) -> None:
    """Plain ``$inc`` from 8 writers: none is overwritten by another's read-modify-write."""
    products.insert_one({"_id": "p1", "product_id": 1, "stock": START})

    def work(col: Collection[Doc], _: int) -> int:
        return sum(
            col.update_one({"_id": "p1"}, {"$inc": {"stock": 1}}).modified_count
            for _ in range(PER_WRITER)
        )

    applied = race(stack_settings.mongodb_url, products, work)

    final = products.find_one({"_id": "p1"})
    assert final is not None
    assert applied == WRITERS * PER_WRITER
    assert final["stock"] == START + applied, f"{START + applied - final['stock']} lost"


def test_find_and_modify_hands_each_value_out_once(
    stack_settings: Settings, products: Collection[Doc]
) -> None:
    """``find_one_and_update`` with ``$inc`` from 8 writers: every returned stock is distinct."""
    products.insert_one({"_id": "p1", "product_id": 1, "stock": 0})
    seen: list[int] = []
    lock = threading.Lock()

    def work(col: Collection[Doc], _: int) -> int:
        mine = []
        for _ in range(PER_WRITER // 2):
            doc = col.find_one_and_update(
                {"_id": "p1"}, {"$inc": {"stock": 1}}, return_document=ReturnDocument.AFTER
            )
            assert doc is not None
            mine.append(int(doc["stock"]))
        with lock:
            seen.extend(mine)
        return len(mine)

    applied = race(stack_settings.mongodb_url, products, work)

    final = products.find_one({"_id": "p1"})
    assert final is not None
    assert len(set(seen)) == len(seen) == applied, f"{len(seen) - len(set(seen))} values twice"
    assert final["stock"] == applied


def test_bulk_compare_and_set_of_many_products_loses_no_update(
    stack_settings: Settings, products: Collection[Doc]
) -> None:
    """stockflow's write: unordered bulk commands of conditional updates over 40 products.

    Every writer reads all products and decrements each, conditional on the stock it read, in
    commands of CHUNK statements as ``Inventory.write_changes`` does (FerretDB holds a pooled
    connection per statement until its command ends); the sum of matched counts must equal the
    total decrement.
    """
    count, rounds = 40, 25
    products.insert_many([{"_id": i, "product_id": i, "stock": START} for i in range(count)])

    def work(col: Collection[Doc], _: int) -> int:
        matched = 0
        for _ in range(rounds):
            read = {doc["_id"]: doc["stock"] for doc in col.find({})}
            ops = [
                UpdateOne({"_id": i, "stock": stock}, {"$set": {"stock": stock - 1}})
                for i, stock in read.items()
            ]
            for chunk in chunks(ops):
                matched += col.bulk_write(list(chunk), ordered=False).matched_count
        return matched

    applied = race(stack_settings.mongodb_url, products, work)

    left = sum(doc["stock"] for doc in products.find({}))
    assert 0 < applied <= WRITERS * rounds * count
    assert count * START - left == applied, f"{applied - (count * START - left)} lost"
