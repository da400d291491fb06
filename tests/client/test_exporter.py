"""The exporter on its own, with a scripted transport where the network is not the point: the outcome table,
counters that stay exact under threads, force_flush() and close() that wait on progress, not on the clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from layerwatch import wire
from layerwatch.batching import BatchBuilder, Packed
from layerwatch.delivery import Outcome, classify, deliver
from layerwatch.exporter import Exporter
from layerwatch.report import Report
from layerwatch.spool import Spool, pending_records
from layerwatch.transport import Delivery
from tests.waiting import wait_until

HEADER = {
    "run": {"key": "k", "name": "k", "project": "p", "world_size": 1, "config": {}},
    "rank": 0,
    "host": "h",
    "pid": 1,
}


class Scripted:
    """A transport whose answer for each batch is ``answer(batch)``; it records what it was sent."""

    def __init__(self, answer: Callable[[dict], Delivery]) -> None:
        self.answer = answer
        self.sent: list[dict] = []
        self.lock = threading.Lock()

    def post_batch(self, payload: bytes) -> Delivery:
        batch = wire.decode(payload)
        with self.lock:
            self.sent.append(batch)
        return self.answer(batch)


OK = Delivery(ok=True, status=202, body={})


def report(end: str | None = None, ready: object = None) -> Report:
    return Report(steps=[], layers=[], bounded=[], dead_windows=[], param_numel=[], flat=None, ready=ready, end=end)


def exporter(tmp_path: Path, transport, max_queued: int = 4) -> Exporter:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    return Exporter(
        BatchBuilder(HEADER, []), spool, transport, max_queued, max_backoff=0.05, on_response=lambda b: None
    )


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(None, Outcome.RETRY), (408, Outcome.RETRY), (429, Outcome.RETRY), (500, Outcome.RETRY), (502, Outcome.RETRY),
     (503, Outcome.RETRY), (504, Outcome.RETRY), (507, Outcome.RETRY), (401, Outcome.KEEP), (403, Outcome.KEEP),
     (404, Outcome.KEEP), (405, Outcome.KEEP), (400, Outcome.POISON), (413, Outcome.POISON), (415, Outcome.POISON),
     (422, Outcome.POISON)],
)  # fmt: skip
def test_the_outcome_table(status, outcome):
    assert classify(Delivery(ok=False, status=status)) is outcome
    assert classify(OK) is Outcome.DELIVERED


def test_retry_after_is_a_floor_and_attempts_are_bounded():
    answers = iter([Delivery(ok=False, status=503, retry_after=2.5), Delivery(ok=False, status=None), OK])
    waits: list[float] = []
    outcome, _ = deliver(Scripted(lambda b: next(answers)), wire.encode({"v": 1}), lambda s, r: waits.append(s) or True)
    assert outcome is Outcome.DELIVERED
    assert waits[0] >= 2.5 and len(waits) == 2
    failing = Scripted(lambda b: Delivery(ok=False, status=500))
    outcome, result = deliver(failing, wire.encode({"v": 1}), lambda s, r: True, attempts=3, max_backoff=0.0)
    assert outcome is Outcome.RETRY and result.status == 500 and len(failing.sent) == 3


def test_a_refused_batch_is_rejected_not_a_dropped_report(tmp_path):
    transport = Scripted(lambda b: Delivery(ok=False, status=422, error="HTTP 422: bad") if b["seq"] == 1 else OK)
    exp = exporter(tmp_path, transport)
    for _ in range(4):
        exp.submit(report())
    assert exp.force_flush(10)
    exp.submit(report(end="finished"))  # built after the refusal: it carries the count
    exp.close(5)
    counts = exp.counters.snapshot()
    assert counts == {"delivered_batches": 4, "dropped_reports": 0, "dropped_batches": 0, "rejected_batches": 1}
    assert [b["seq"] for b in transport.sent] == [0, 1, 2, 3, 4]  # the refused one held nothing up
    assert transport.sent[-1]["dropped"] == {"reports": 0, "batches": 0, "rejected": 1}
    assert pending_records(tmp_path / "spool" / "rejected") == 1


def test_dropped_reports_are_counted_exactly_from_many_threads(tmp_path):
    gate = threading.Event()

    class Gate:  # stands in for a CUDA event: the exporter thread waits on it while building
        def synchronize(self) -> None:
            gate.wait()

    exp = exporter(tmp_path, Scripted(lambda b: OK))
    exp.submit(report(ready=Gate()))  # taken by the exporter thread, which then waits
    wait_until(lambda: not exp._reports.qsize(), 10, "the exporter thread to take the gated report")
    threads = [threading.Thread(target=lambda: [exp.submit(report()) for _ in range(500)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert exp.counters["dropped_reports"] == 8 * 500 - 32  # the queue holds 32; every other one is counted
    gate.set()
    assert exp.force_flush(10)
    exp.close(5)
    assert exp.counters["delivered_batches"] == 33


def test_force_flush_says_whether_everything_was_delivered(tmp_path):
    up = threading.Event()
    exp = exporter(tmp_path, Scripted(lambda b: OK if up.is_set() else Delivery(ok=False, error="down")))
    exp.submit(report())
    assert not exp.force_flush(0.3)  # the collector is down: not delivered (it waits in the spool)
    assert pending_records(tmp_path / "spool") == 1
    up.set()
    assert exp.force_flush(10)
    exp.close(5)
    assert exp.force_flush(0)  # after close: nothing left


def test_close_returns_as_soon_as_the_last_batch_is_delivered(tmp_path):
    release = threading.Event()

    def answer(batch: dict) -> Delivery:
        release.wait()
        return OK

    transport = Scripted(answer)
    exp = exporter(tmp_path, transport)
    exp.submit(report(end="finished"))
    closer = threading.Thread(target=exp.close, args=(60,))
    closer.start()
    wait_until(lambda: transport.sent, 10, "the batch to be sent")
    assert closer.is_alive()  # close() waits for the answer
    released = time.monotonic()
    release.set()
    closer.join(10)
    assert not closer.is_alive() and time.monotonic() - released < 1.0
    assert exp.counters["delivered_batches"] == 1


def test_submit_after_close_neither_blocks_nor_raises(tmp_path):
    exp = exporter(tmp_path, None)  # offline
    exp.close(1)
    for _ in range(100):
        exp.submit(report())
    assert exp.counters["dropped_reports"] == 100


def test_a_packed_batch_reads_like_wire_encode():
    step = {"step": 1, "time": 1.5, "loss": float("nan"), "layers": [[0, 1.0, None]]}
    batch = {"v": 1, **HEADER, "seq": 3, "steps": [step]}
    dropped = {"reports": 1, "batches": 2, "rejected": 3}
    decoded = wire.decode(Packed.of(batch).encode(dropped))
    assert str(decoded) == str({**batch, "dropped": dropped})  # str: NaN != NaN
