"""The on-disk spool: order, acknowledgement, torn tails, the size cap, and a training process killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from layerwatch import spool, wire
from tests.client.conftest import read_spool


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


def test_the_spool_of_a_killed_training_process_stays_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
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
