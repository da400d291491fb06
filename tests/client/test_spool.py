"""The on-disk spool: order, acknowledgement, torn tails, the size cap, and a training process killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from layerwatch import spool, wire
from layerwatch.cli import main as cli
from tests.client.conftest import read_spool
from tests.waiting import wait_until


def test_records_come_back_in_order_and_ack_survives_a_new_instance(tmp_path):
    queue = spool.Spool(tmp_path, max_bytes=1 << 20)
    for i in range(5):
        assert queue.append(f"record-{i}".encode())
    seen = []
    for _ in range(2):
        segment, offset, payload = queue.head()
        seen.append(payload)
        queue.ack(segment, offset)
    reopened = spool.Spool(tmp_path, max_bytes=1 << 20)
    while (head := reopened.head()) is not None:
        seen.append(head[2])
        reopened.ack(head[0], head[1])
    assert seen == [f"record-{i}".encode() for i in range(5)]
    assert reopened.pending_bytes == 0


def test_pending_records_counts_beside_an_exporter_that_deletes_delivered_segments(tmp_path, monkeypatch):
    """`layerwatch sync` and the tests count a live spool: a segment deleted after the listing counts 0."""
    queue = spool.Spool(tmp_path, max_bytes=1 << 20)
    for i in range(3):
        assert queue.append(f"record-{i}".encode())
    listed = spool.segments(tmp_path)
    monkeypatch.setattr(spool, "segments", lambda d: [tmp_path / f"{0:020d}-1{spool.SUFFIX}", *listed])
    assert spool.pending_records(tmp_path) == 3


def test_a_torn_tail_is_skipped_not_fatal(tmp_path, caplog):
    queue = spool.Spool(tmp_path, max_bytes=1 << 20)
    queue.append(b"whole")
    segment = spool.segments(tmp_path)[0]
    with open(segment, "ab") as f:
        f.write(spool.HEADER.pack(spool.MAGIC, 100, 0) + b"only part of it")
    assert [p for _, p in spool.read_records(segment)] == [b"whole"]
    assert "torn or corrupt tail" in caplog.text


def test_a_corrupt_record_ends_the_readable_part(tmp_path):
    queue = spool.Spool(tmp_path, max_bytes=1 << 20)
    queue.append(b"first")
    queue.append(b"second")
    segment = spool.segments(tmp_path)[0]
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF  # flip a bit of the second payload: its CRC no longer matches
    segment.write_bytes(bytes(data))
    assert [p for _, p in spool.read_records(segment)] == [b"first"]


def test_the_size_cap_refuses(tmp_path):
    """The spool says no; the exporter decides what to keep and counts what it drops (test_delivery)."""
    queue = spool.Spool(tmp_path, max_bytes=100)
    assert queue.append(b"x" * 50)
    assert not queue.append(b"y" * 50)
    assert queue.pending_bytes == spool.HEADER.size + 50


TRAINER = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import layerwatch
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    mon = layerwatch.watch(model, mode="offline", spool_dir=sys.argv[1], every=2, run_key="killed")
    step = 0
    while True:
        model(torch.randn(4, 8)).sum().backward()
        mon.step(loss=torch.tensor(float(step)))
        model.zero_grad()
        step += 1
        if step == 20:
            print("ready", flush=True)
        time.sleep(0.002)
    """
)


def _spooled_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob(f"*{spool.SUFFIX}"))


def test_the_spool_of_a_killed_training_process_stays_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        at_ready = _spooled_bytes(tmp_path)  # killed while it goes on writing, not after a pause
        wait_until(lambda: _spooled_bytes(tmp_path) > at_ready, 30, "the trainer to spool more after step 20")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # A kill can land mid-write: simulate the worst case by appending half a record.
    segment = sorted(Path(tmp_path).rglob(f"*{spool.SUFFIX}"))[-1]
    with open(segment, "ab") as f:
        f.write(spool.HEADER.pack(spool.MAGIC, 4096, 0)[:7])
    batches = read_spool(tmp_path)
    steps = [s["step"] for b in batches for s in b["steps"]]
    assert len(steps) >= 20
    assert steps == list(range(len(steps)))  # contiguous from 0: nothing reordered, nothing in between lost
    assert all(b["v"] == wire.VERSION for b in batches)


def _records(directory: Path, n: int) -> tuple[Path, list[int]]:
    """A spool of ``n`` records ``record-i``; the segment and each record's start offset."""
    queue = spool.Spool(directory, max_bytes=1 << 20)
    for i in range(n):
        assert queue.append(f"record-{i}".encode())
    segment = spool.segments(directory)[0]
    return segment, _starts(segment)


def _starts(segment: Path) -> list[int]:
    """Where each record of an intact segment begins."""
    return [0, *[end for end, _ in spool.read_records(segment)][:-1]]


@pytest.mark.parametrize("where", ["payload", "magic", "length"])
def test_a_corrupt_middle_record_costs_only_itself(tmp_path, where):
    segment, starts = _records(tmp_path, 5)
    data = bytearray(segment.read_bytes())
    data[starts[2] + {"payload": spool.HEADER.size + 1, "magic": 1, "length": 5}[where]] ^= 0x5A
    segment.write_bytes(bytes(data))
    spans: list[spool.Corrupt] = []
    payloads = [p for _, p in spool.read_records(segment, on_corrupt=spans.append)]
    assert payloads == [f"record-{i}".encode() for i in (0, 1, 3, 4)]  # resynchronised at the next record
    assert [(s.offset, s.end, s.tail) for s in spans] == [(starts[2], starts[3], False)]


def test_the_spool_delivers_around_a_corrupt_record_and_keeps_its_bytes_aside(tmp_path):
    segment, starts = _records(tmp_path, 5)
    data = bytearray(segment.read_bytes())
    data[starts[2] + spool.HEADER.size] ^= 0xFF
    segment.write_bytes(bytes(data))
    queue = spool.Spool(tmp_path, max_bytes=1 << 20)
    delivered = []
    while (head := queue.head()) is not None:
        assert segment.exists()  # deleted only once every readable record in it was delivered
        delivered.append(head[2])
        queue.ack(head[0], head[1])
    assert delivered == [f"record-{i}".encode() for i in (0, 1, 3, 4)]
    assert not segment.exists() and queue.pending_bytes == 0
    assert [(s.segment, s.offset) for s in queue.corrupt] == [(segment, starts[2])]
    kept = tmp_path / spool.CORRUPT / f"{segment.stem}-{starts[2]}.bin"
    assert kept.read_bytes() == bytes(data[starts[2] : starts[3]])


def test_sync_reports_a_corrupt_record_with_its_segment_and_offset(collector, tmp_path):
    queue = spool.Spool(tmp_path / "run", max_bytes=1 << 20)
    for seq in range(4):
        queue.append(wire.encode(_batch(seq)))
    segment = spool.segments(tmp_path / "run")[0]
    starts = _starts(segment)
    data = bytearray(segment.read_bytes())
    data[starts[1] + spool.HEADER.size + 3] ^= 0xFF
    segment.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["sync", str(tmp_path), "--url", collector.url])
    assert result.exit_code == 1  # a record was lost
    assert f"unreadable bytes at byte {starts[1]}" in result.output and segment.name in result.output
    assert sorted(b["seq"] for b in collector.batches) == [0, 2, 3]
    assert list((tmp_path / "run" / spool.CORRUPT).glob("*.bin")) and not segment.exists()


def _batch(seq: int) -> dict:
    run = {"key": "corrupt", "name": "corrupt", "project": "p", "world_size": 1}
    steps = [{"step": seq, "time": 1.0, "layers": [], "params": []}]
    return {"v": wire.VERSION, "run": run, "rank": 0, "host": "h", "pid": 1, "seq": seq, "steps": steps}
