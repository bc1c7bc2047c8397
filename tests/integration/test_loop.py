"""The consume loop on the real Kafka: bounded runs, outputs that cannot be produced."""

from __future__ import annotations

import threading

from stockflow.config import Settings
from stockflow.orders import Order
from stockflow.pipeline import Pipeline
from stockflow.producer import OrderProducer
from stockflow.worker import Worker, WorkerStats


def test_a_bounded_worker_run_commits_that_many_orders_and_applies_them(
    settings: Settings, pipeline: Pipeline
) -> None:
    pipeline.inventory.seed({101: 100})
    with OrderProducer(settings) as producer:
        for i in range(7):
            producer.send(Order(i, 101, 1))
    result: list[WorkerStats] = []
    worker = Worker(settings, pipeline)
    thread = threading.Thread(target=lambda: result.append(worker.run(max_messages=5)))
    thread.start()
    thread.join(90)
    if thread.is_alive():
        worker.stop()
        thread.join(30)
    [stats] = result
    assert (stats.router.messages, stats.applier.messages) == (5, 5)
    assert pipeline.inventory.stock_of(101) == 95
