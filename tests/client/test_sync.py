"""`layerwatch sync` with several batches in flight: deliveries finish in any order, acknowledgements do not;
the batches of one sender thread share a kept-alive connection."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from layerwatch import spool, wire
from layerwatch.cli import _Upload
from layerwatch.cli import main as cli
from layerwatch.transport import Delivery, HttpTransport, KeptAliveTransport
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
        self.follows: dict[int, str | None] = {}  # the Layerwatch-Follows header each batch came with

    def post_batch(self, payload: bytes, headers: dict[str, str] | None = None) -> Delivery:
        seq = wire.decode(payload)["seq"]
        with self.lock:
            self.seen_before[seq] = set(self.delivered)
            self.follows[seq] = (headers or {}).get(wire.FOLLOWS_HEADER)
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


def spooled(directory: Path, pids: list[int] | None = None) -> spool.Spool:
    """BATCHES batches of one rank, made by the processes ``pids`` (one each; by default all by one)."""
    queue = spool.Spool(directory, max_bytes=1 << 30)
    for seq in range(BATCHES):
        end = {"status": "finished"} if seq == BATCHES - 1 else None
        run = {"key": "k", "project": "p"}
        pid = pids[seq] if pids else 7
        batch = {"v": wire.VERSION, "run": run, "rank": 0, "pid": pid, "seq": seq, "steps": [{"step": seq}], "end": end}
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


def test_each_batch_names_the_one_before_it_while_that_one_is_on_its_way(tmp_path):
    transport = Gated(held=set(range(BATCHES)), answer=Delivery(ok=True))
    up = upload(transport, in_flight=4)
    done = threading.Thread(target=up.drain, args=(spooled(tmp_path),))
    done.start()
    assert wait_until(lambda: len(transport.follows) == 4)  # four on their way
    assert transport.follows == {0: None, 1: "0", 2: "1", 3: "2"}  # 0 went first: nothing before it
    transport.release.set()
    done.join(30)
    assert transport.follows[BATCHES - 1] is None  # the last goes when all are delivered: nothing to wait for


def test_a_batch_of_another_process_follows_nothing(tmp_path):
    """A rank's process that started again numbers its batches from 0 again (another ``pid``)."""
    transport = Gated(held=set(range(BATCHES)), answer=Delivery(ok=True))
    up = upload(transport, in_flight=4)
    done = threading.Thread(target=up.drain, args=(spooled(tmp_path, pids=[7, 7, 8, 8, 8, 8, 8, 8]),))
    done.start()
    assert wait_until(lambda: len(transport.follows) == 4)
    assert transport.follows == {0: None, 1: "0", 2: None, 3: "2"}
    transport.release.set()
    done.join(30)


def test_sync_in_flight_against_a_collector(collector, tmp_path):
    spooled(tmp_path / "run" / "rank-0")
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "run"), "--url", collector.url, "--in-flight", "3"])
    assert result.exit_code == 0, result.output
    assert "Uploaded 8 batch(es)" in result.output
    assert collector.batches[-1]["end"] == {"status": "finished"}
    assert not spool.segments(tmp_path / "run" / "rank-0")


class KeepAlive:
    """An HTTP/1.1 server that keeps connections open, notes each request's client port, and can drop a
    connection after answering (``drop_after``) without saying so, as a collector closing an idle one does."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.bodies: list[bytes] = []
        self.drop_after = False
        self.answer = (202, b'{"run_id": "r"}')
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                server.ports.append(self.client_address[1])
                status, body = server.answer
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = server.drop_after

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def keep_alive():
    server = KeepAlive()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_batches_share_one_connection_and_outlive_its_close(keep_alive):
    sender = KeptAliveTransport(keep_alive.url, token="t", timeout=5)
    assert all(sender.post_batch(b"%d" % i).ok for i in range(3))
    assert len(set(keep_alive.ports)) == 1  # one connection for the three

    keep_alive.drop_after = True
    assert sender.post_batch(b"3").ok  # answered, then the server drops the connection
    keep_alive.drop_after = False
    result = sender.post_batch(b"4")  # goes out on the dead connection first, then again on a new one
    assert result.ok and result.status == 202 and result.body == {"run_id": "r"}
    assert keep_alive.bodies == [b"0", b"1", b"2", b"3", b"4"]
    assert len(set(keep_alive.ports)) == 2


def test_an_answer_is_described_as_urllib_describes_it(keep_alive):
    keep_alive.answer = (422, b'{"detail": "steps: 60000 rows"}')
    kept = KeptAliveTransport(keep_alive.url).post_batch(b"x")
    plain = HttpTransport(keep_alive.url).post_batch(b"x")
    assert kept == plain
    assert kept.status == 422 and kept.error == "HTTP 422: steps: 60000 rows" and not kept.ok
    down = KeptAliveTransport("http://127.0.0.1:9").post_batch(b"x")
    assert not down.ok and down.status is None and down.error.startswith("cannot reach http://127.0.0.1:9")


def test_ctrl_c_stops_a_sync_at_once_and_skips_nothing(tmp_path):
    """A collector that takes the connections and never answers; Ctrl-C ends the sync without waiting for them."""
    spooled(tmp_path / "run" / "rank-0")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(30)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        sync = subprocess.Popen(
            [sys.executable, "-m", "layerwatch.cli", "sync", str(tmp_path / "run"), "--url", url, "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            taken, _ = silent.accept()  # a batch is on its way
            with taken:
                sync.send_signal(signal.SIGINT)
                assert sync.wait(timeout=15) != 0
        finally:
            sync.kill()
    assert spool.pending_records(tmp_path / "run" / "rank-0") == BATCHES
