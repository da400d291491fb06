"""`layerwatch sync` with several batches in flight: deliveries finish in any order, acknowledgements do not."""

from __future__ import annotations

import threading
from pathlib import Path

from click.testing import CliRunner

from layerwatch import spool, wire
from layerwatch.cli import _Upload
from layerwatch.cli import main as cli
from layerwatch.transport import Delivery
from tests.waiting import wait_until

BATCHES = 8


class Gated:
    """A transport that answers each batch as soon as it comes, except those in ``held``, which wait for
    ``release`` and then get ``answer``. It notes which batches were already delivered when each one came."""

    def __init__(self, held: set[int], answer: Delivery) -> None:
        self.held, self.answer = held, answer
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.delivered: list[int] = []
        self.seen_before: dict[int, set[int]] = {}

    def post_batch(self, payload: bytes) -> Delivery:
        seq = wire.decode(payload)["seq"]
        with self.lock:
            self.seen_before[seq] = set(self.delivered)
        if seq in self.held:
            self.release.wait(30)
            if not self.answer.ok:
                return self.answer
        with self.lock:
            self.delivered.append(seq)
        return Delivery(ok=True, status=202)


class Status:
    def update(self, text: str) -> None:
        pass


def spooled(directory: Path) -> spool.Spool:
    queue = spool.Spool(directory, max_bytes=1 << 30)
    for seq in range(BATCHES):
        end = {"status": "finished"} if seq == BATCHES - 1 else None
        batch = {"v": wire.VERSION, "run": {"key": "k"}, "rank": 0, "seq": seq, "steps": [{"step": seq}], "end": end}
        queue.append(wire.encode(batch))
    return spool.Spool(directory, max_bytes=1 << 30)  # as sync opens it


def upload(transport: Gated, in_flight: int = 4) -> _Upload:
    up = _Upload(transport, "http://collector", retries=0, in_flight=in_flight)
    up.status = Status()
    return up


def test_acknowledgements_wait_for_the_oldest_batch_in_flight(tmp_path):
    queue = spooled(tmp_path)
    transport = Gated(held={0}, answer=Delivery(ok=False, status=404, error="HTTP 404: no such project"))
    up = upload(transport)
    done = threading.Thread(target=up.drain, args=(queue,))
    done.start()
    assert wait_until(lambda: up.sent == BATCHES - 2)  # all but the first, still on its way, and the last
    assert sorted(transport.delivered) == list(range(1, BATCHES - 1))
    assert spool.pending_records(tmp_path) == BATCHES  # nothing marked delivered past the first
    transport.release.set()  # ... and it is refused: the sync stops (a kill at any moment leaves the same)
    done.join(30)
    assert up.failed == 1 and up.stopped
    assert spool.pending_records(tmp_path) == BATCHES  # 1-3 arrived but are not skipped: they go again

    again = Gated(held=set(), answer=Delivery(ok=True))
    assert upload(again).drain(spool.Spool(tmp_path, max_bytes=1 << 30))
    assert sorted(again.delivered) == list(range(BATCHES))
    assert spool.pending_records(tmp_path) == 0 and not spool.segments(tmp_path)


def test_acknowledgements_follow_the_deliveries_that_finished_in_order(tmp_path):
    queue = spooled(tmp_path)
    transport = Gated(held={2}, answer=Delivery(ok=True))
    up = upload(transport)
    done = threading.Thread(target=up.drain, args=(queue,))
    done.start()
    assert wait_until(lambda: up.sent == BATCHES - 2)  # all but the held one and the last
    assert wait_until(lambda: spool.pending_records(tmp_path) == BATCHES - 2)  # 0 and 1: up to the held one
    assert spool.pending_records(tmp_path) == BATCHES - 2  # and no further
    transport.release.set()
    done.join(30)
    assert spool.pending_records(tmp_path) == 0


def test_the_last_batch_goes_after_all_the_others(tmp_path):
    transport = Gated(held={1}, answer=Delivery(ok=True))
    done = threading.Thread(target=upload(transport, in_flight=BATCHES).drain, args=(spooled(tmp_path),))
    done.start()
    assert wait_until(lambda: len(transport.delivered) == BATCHES - 2)  # all but the held one and the last
    assert BATCHES - 1 not in transport.seen_before  # the run's end waits
    transport.release.set()
    done.join(30)
    assert transport.delivered[-1] == BATCHES - 1
    assert transport.seen_before[BATCHES - 1] == set(range(BATCHES - 1))


def test_a_failing_batch_stops_its_spool_and_keeps_the_rest(tmp_path):
    queue = spooled(tmp_path)
    transport = Gated(held={3}, answer=Delivery(ok=False, status=503, error="HTTP 503: busy"))
    up = upload(transport)
    done = threading.Thread(target=up.drain, args=(queue,))
    done.start()
    assert wait_until(lambda: len(transport.delivered) >= 3)
    transport.release.set()
    done.join(30)
    assert up.failed == 1 and not up.stopped  # retryable: the next spool may still go
    assert spool.pending_records(tmp_path) == BATCHES - 3  # 0-2 delivered in order; 3 on is sent again later
    assert BATCHES - 1 not in transport.seen_before  # nothing was sent after the failure but what was in flight


def test_sync_in_flight_against_a_collector(collector, tmp_path):
    spooled(tmp_path / "run" / "rank-0")
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "run"), "--url", collector.url, "--in-flight", "3"])
    assert result.exit_code == 0, result.output
    assert "Uploaded 8 batch(es)" in result.output
    assert collector.batches[-1]["end"] == {"status": "finished"}
    assert not spool.segments(tmp_path / "run" / "rank-0")
