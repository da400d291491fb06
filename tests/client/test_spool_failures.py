"""A spool that cannot be written (read-only, full, capped) while the collector is down: training finishes,
close() returns, nothing raises; batches wait in memory up to the bound, then the oldest are dropped and
counted, with one warning; spooling resumes once the disk takes writes; what was kept is delivered later."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

import layerwatch
from layerwatch import spool
from layerwatch.cli import main as cli
from tests.client.conftest import read_spool
from tests.client.fake_collector import FakeCollector
from tests.client.test_delivery import train, wait_for

WARNING = "cannot write the spool"


def warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings about a spool that cannot be written."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and WARNING in r.getMessage()]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    """mount(path, options): a small tmpfs at ``path`` (root only; skips cleanly where mounting is refused)."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "lw-test", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def down() -> Iterator[FakeCollector]:
    """A collector that is down at first (connection refused); ``down.start()`` brings it back on its port."""
    server = FakeCollector()
    server.stop()
    yield server
    server.stop()


def read_only_dir(path: Path, tmpfs) -> Path:
    if os.geteuid() == 0:
        return tmpfs(path, "ro,size=64k")  # root writes through file modes
    path.mkdir()
    path.chmod(0o500)
    return path


def watch(spool_dir: Path, url: str, **kwargs):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    settings = {"every": 2, "max_queued_batches": 3, "timeout": 0.5, "max_backoff": 0.1, "flush_timeout": 10.0}
    return model, layerwatch.watch(model, url=url, spool_dir=spool_dir, **{**settings, **kwargs})


def test_read_only_spool_and_collector_down_then_back(tmp_path, tmpfs, down, caplog):
    spool_dir = read_only_dir(tmp_path / "ro", tmpfs)
    model, mon = watch(spool_dir, down.url)
    with caplog.at_level(logging.INFO, logger="layerwatch"):
        train(mon, model, 20)  # 10 batches; at most 3 in memory and 1 in flight survive
        assert wait_for(lambda: mon.stats["held_batches"] + mon.stats["dropped_batches"] == 10)
        dropped = mon.stats["dropped_batches"]
        assert dropped >= 6
        assert len(warned(caplog)) == 1 and str(spool_dir) in warned(caplog)[0]  # one warning, naming it
        down.start()  # the collector comes back: what memory kept is delivered
        assert wait_for(lambda: mon.stats["held_batches"] == 0)
        assert len(down.steps()) == 20 - 2 * dropped
        train(mon, model, 10, start=20)  # more than 3 batches at once still overflow memory (the disk refuses)
        mon.close()  # returns; nothing raised
    assert len(warned(caplog)) == 1
    dropped = mon.stats["dropped_batches"]
    assert len(down.steps()) == 30 - 2 * dropped  # only the counted drops are missing
    assert set(down.received.values()) == {1}
    assert mon.stats["dropped_batches"] == dropped and mon.stats["dropped_reports"] == 0
    assert down.batches[-1]["dropped"] == {"reports": 0, "batches": dropped, "rejected": 0}  # the count arrived
    assert down.batches[-1]["end"] == {"status": "finished"}


def fill(directory: Path, room: int) -> Path:
    """Fill a file system until it refuses, then free ``room`` bytes; the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, filler.stat().st_size - room)
    return filler


def test_full_spool_and_collector_down_then_sync(tmp_path, tmpfs, down, caplog):
    disk = tmpfs(tmp_path / "full", "size=256k")
    filler = fill(disk, room=8192)
    model, mon = watch(disk / "spool", down.url, every=1, flush_timeout=1.0)
    with caplog.at_level(logging.INFO, logger="layerwatch"):
        train(mon, model, 60)  # ~570 bytes a batch: about 14 fit, 4 wait in memory, the rest are dropped

        def accounted() -> bool:
            records = spool.pending_records(mon.spool_dir)
            return records + mon.stats["held_batches"] + mon.stats["dropped_batches"] == 60

        assert wait_for(accounted)
        dropped = mon.stats["dropped_batches"]
        assert dropped > 0 and len(warned(caplog)) == 1 and str(mon.spool_dir) in caplog.text

        filler.unlink()  # the disk has room again: spooling resumes, nothing more is dropped
        train(mon, model, 10, start=60)
        assert wait_for(lambda: spool.pending_records(mon.spool_dir) + mon.stats["held_batches"] == 70 - dropped)
        assert "takes writes again" in caplog.text
        mon.close()  # the collector is still down: close() returns after flush_timeout, everything spooled
    assert mon.stats["dropped_batches"] == dropped and len(warned(caplog)) == 1
    kept = read_spool(mon.spool_dir)
    assert len(kept) == 71 - dropped  # 70 steps and the end, less what was dropped

    down.start()
    result = CliRunner().invoke(cli, ["sync", str(disk / "spool"), "--url", down.url])
    assert result.exit_code == 0, result.output
    assert down.steps() == {(mon.run_key, 0, s["step"]) for b in kept for s in b["steps"]}
    assert len(down.steps()) == 70 - dropped and set(down.received.values()) == {1}
    assert down.batches[-1]["dropped"]["batches"] == dropped and down.batches[-1]["end"] == {"status": "finished"}
    assert not spool.segments(mon.spool_dir)


def test_a_capped_spool_drops_and_counts_offline(tmp_path, caplog):
    """Where no tmpfs can be mounted, the spool's own cap stands in for a full disk."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with caplog.at_level(logging.INFO, logger="layerwatch"):
        mon = layerwatch.watch(model, every=1, spool_max_mb=8 / 1024, max_queued_batches=3)  # offline, 8 KiB
        train(mon, model, 40)
        mon.close()
    dropped = mon.stats["dropped_batches"]
    assert dropped > 0 and len(warned(caplog)) == 1 and "cap of 8192 bytes" in caplog.text
    assert len(read_spool(tmp_path / "spool")) + dropped == 41


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """Exceptions that ended a thread (the exporter's threads must never end that way)."""
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    return seen


def test_the_with_block_exits_cleanly_when_the_spool_path_is_blocked(tmp_path, down, thread_errors):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # no permission needed: mkdir fails for root too
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with layerwatch.watch(model, url=down.url, spool_dir=blocked, every=2, max_queued_batches=2, flush_timeout=0.5,
                          max_backoff=0.1) as mon:  # fmt: skip
        train(mon, model, 20)
    assert mon.stats["delivered_batches"] == 0
    assert mon.stats["dropped_batches"] == 11  # 10 reports and the end, none could be kept
    assert thread_errors == []


EXITING = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import layerwatch
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(model, url=sys.argv[1], spool_dir=sys.argv[2], every=2, flush_timeout=0.5, max_backoff=0.1)
    for step in range(10):
        model(torch.randn(4, 4)).sum().backward()
        mon.step(loss=torch.tensor(float(step)))
        model.zero_grad()
    print("trained", flush=True)
    """
)


def test_atexit_close_with_a_blocked_spool_and_no_collector(tmp_path, down):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    done = subprocess.run(
        [sys.executable, "-c", EXITING, down.url, str(blocked)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "trained"
    assert "Traceback" not in done.stderr, done.stderr
    assert "6 batches were dropped" in done.stderr and str(blocked) in done.stderr  # 5 reports and the end
