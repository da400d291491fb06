"""Fault suite: the client's delivery under the faults of issue #12, against a real collector process.

    python bench/faults.py                  # every fault, 60 steps each
    python bench/faults.py --steps 200 --only poison,corrupt

Each fault trains a small model with layerwatch (a real collector on SQLite, started and stopped as the fault
needs; the spool on a small tmpfs where one can be mounted) and then counts, per run:

- trained: steps the training loop recorded;
- acked: distinct steps in batches the collector answered 2xx (counted at the HTTP call, for the run and for
  ``layerwatch sync`` alike), and dup: acknowledgements beyond a step's first (re-sends; the collector stores a
  step once);
- stored: distinct steps in the collector's database;
- lost: trained - stored, and counted: the losses the client accounted for (batches dropped for want of room,
  set aside as refused, or unreadable in the spool). A loss the client did not count is the failure to look for.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from click.testing import CliRunner
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the real-server fixtures
import layerwatch
from layerwatch import spool, transport, wire
from layerwatch.cli import main as cli
from tests.service.server import free_port, running_server


class Acks:
    """Counts acknowledged steps at the one HTTP call every delivery goes through."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        post = transport.post_batch

        def counted(url: str, payload: bytes, token: str | None, timeout: float) -> transport.Delivery:
            result = post(url, payload, token, timeout)
            if result.ok:
                batch = wire.decode(payload)
                with self._lock:
                    for step in batch["steps"]:
                        self.counts[(batch["run"]["key"], step["step"])] += 1
            return result

        transport.post_batch = counted

    def of(self, key: str) -> tuple[int, int]:
        with self._lock:
            seen = [n for (k, _), n in self.counts.items() if k == key]
        return len(seen), sum(seen) - len(seen)


class Collector:
    """A real collector on one port and one SQLite file, to stop and start again."""

    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "collector.db"
        self.log = tmp / "collector.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stack: contextlib.ExitStack | None = None
        migrate = [sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", f"sqlite:///{self.db}"]
        subprocess.run(migrate, check=True, capture_output=True)

    def start(self) -> None:
        self._stack = contextlib.ExitStack()
        env = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off"}
        self._stack.enter_context(
            running_server(f"sqlite:///{self.db}", log_path=self.log, env=env, args=("--no-auth",), port=self.port)
        )

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def stored(self, key: str) -> int:
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            query = "SELECT COUNT(*) FROM step_stats s JOIN runs r ON r.id = s.run_id WHERE r.key = ?"
            return db.execute(query, (key,)).fetchone()[0]


@dataclass
class Outcome:
    fault: str
    tried: str
    key: str
    trained: int
    counted: dict[str, int]
    counted_steps: int  # steps in what the client counted as lost
    sync: str = "-"


class Tmpfs:
    """Small tmpfs mounts (root only); None where mounting is refused, and the fault is skipped."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, options: str) -> Path | None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "lw-faults", str(path)], capture_output=True)
        if done.returncode != 0:
            return None
        self.mounted.append(path)
        return path

    def unmount_all(self) -> None:
        for path in self.mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def train(mon: layerwatch.Monitor, net: nn.Module, steps: range) -> None:
    for step in steps:
        net(torch.randn(8, 16)).sum().backward()
        mon.step(loss=torch.tensor(float(step)))
        net.zero_grad()


def sync(*args: str) -> str:
    result = CliRunner().invoke(cli, ["sync", *args])
    return f"exit {result.exit_code}"


def counted(mon: layerwatch.Monitor, corrupt: int = 0) -> dict[str, int]:
    stats = mon.stats
    return {"dropped": stats["dropped_batches"], "rejected": stats["rejected_batches"], "corrupt": corrupt}


class Faults:
    def __init__(self, tmp: Path, steps: int, every: int, collector: Collector, tmpfs: Tmpfs) -> None:
        self.tmp, self.steps, self.every, self.collector, self.tmpfs = tmp, steps, every, collector, tmpfs

    def watch(self, name: str, net: nn.Module, spool_dir: Path, url: str | None, **kwargs) -> layerwatch.Monitor:
        settings = {"every": self.every, "timeout": 1.0, "max_backoff": 0.5, "flush_timeout": 30.0}
        key = f"{name}-{uuid.uuid4().hex[:6]}"
        return layerwatch.watch(net, url=url, spool_dir=spool_dir, run_key=key, **{**settings, **kwargs})

    def dead_then_back(self) -> Outcome:
        self.collector.stop()
        net = model()
        mon = self.watch("dead", net, self.tmp / "dead", self.collector.url)
        train(mon, net, range(self.steps // 2))
        self.collector.start()
        train(mon, net, range(self.steps // 2, self.steps))
        mon.close()
        tried = "collector down for the first half of the run, then started; close()"
        return Outcome("dead collector, then back", tried, mon.run_key, self.steps, counted(mon), 0)

    def read_only_spool(self) -> Outcome | None:
        directory = self.tmpfs.mount(self.tmp / "ro", "ro,size=64k")
        if directory is None:
            return None
        self.collector.stop()
        net = model()
        mon = self.watch("readonly", net, directory, self.collector.url, max_queued_batches=4)
        train(mon, net, range(self.steps // 2))
        self.collector.start()
        mon.force_flush(30)
        train(mon, net, range(self.steps // 2, self.steps))
        mon.close()
        tried = "read-only spool (tmpfs ro), collector down for the first half, then started; close()"
        c = counted(mon)
        return Outcome("read-only spool", tried, mon.run_key, self.steps, c, c["dropped"] * self.every)

    def full_spool(self) -> Outcome | None:
        disk = self.tmpfs.mount(self.tmp / "full", "size=256k")
        if disk is None:
            return None
        _fill(disk, room=8192)
        self.collector.stop()
        net = model()
        mon = self.watch("full", net, disk / "spool", self.collector.url, max_queued_batches=4, flush_timeout=2.0)
        train(mon, net, range(self.steps))
        mon.close()  # the collector is still down
        self.collector.start()
        outcome = sync(str(disk / "spool"), "--url", self.collector.url)
        tried = "spool on a full tmpfs (8 KiB free), collector down until after close(); then `layerwatch sync`"
        c = counted(mon)
        lost = c["dropped"] * self.every - (self.every if c["dropped"] and _end_lost(mon) else 0)
        return Outcome("full spool", tried, mon.run_key, self.steps, c, lost, outcome)

    def corrupt_record(self) -> Outcome:
        net = model()
        mon = self.watch("corrupt", net, self.tmp / "corrupt", None)  # offline
        train(mon, net, range(self.steps))
        mon.close()
        segment = spool.segments(mon.spool_dir)[0]
        ends = [end for end, _ in spool.read_records(segment)]
        middle = len(ends) // 2
        data = bytearray(segment.read_bytes())
        data[ends[middle - 1] + spool.HEADER.size + 5] ^= 0xFF  # a flipped byte in a middle record's payload
        segment.write_bytes(bytes(data))
        self.collector.start()
        outcome = sync(str(self.tmp / "corrupt"), "--url", self.collector.url)
        corrupt = len(list((mon.spool_dir / spool.CORRUPT).glob("*.bin")))
        tried = f"offline run, one byte flipped in record {middle} of {len(ends)}; then `layerwatch sync`"
        return Outcome(
            "corrupt record", tried, mon.run_key, self.steps, counted(mon, corrupt), corrupt * self.every, outcome
        )

    def poison_batch(self) -> Outcome:
        self.collector.start()
        deep: dict = {}
        for _ in range(40):
            deep = {"a": deep}
        net = model()
        mon = self.watch("poison", net, self.tmp / "poison", self.collector.url, config={"deep": deep})
        train(mon, net, range(self.steps))
        mon.close()
        outcome = sync(str(self.tmp / "poison"), "--url", self.collector.url, "--rejected")
        tried = "first batch's config nested 40 deep (the collector answers 422), good batches after it"
        c = counted(mon)
        return Outcome(
            "poison batch, then good ones", tried, mon.run_key, self.steps, c, c["rejected"] * self.every, outcome
        )

    def wrong_url(self) -> Outcome:
        self.collector.start()
        net = model()
        mon = self.watch("wrongurl", net, self.tmp / "wrongurl", self.collector.url + "/wrong-prefix")
        train(mon, net, range(self.steps))
        mon.close()
        outcome = sync(str(self.tmp / "wrongurl"), "--url", self.collector.url)
        tried = "a wrong URL prefix (404: kept, not set aside); then `layerwatch sync` with the right URL"
        return Outcome("wrong URL (404)", tried, mon.run_key, self.steps, counted(mon), 0, outcome)


def _fill(directory: Path, room: int) -> None:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    os.truncate(filler, filler.stat().st_size - room)


def _end_lost(mon: layerwatch.Monitor) -> bool:
    """Whether the run's last batch (the end marker, with no steps of its own) was among those dropped."""
    batches = [wire.decode(p) for seg in spool.segments(mon.spool_dir) for _, p in spool.read_records(seg)]
    return not any(b.get("end") for b in batches)


FAULTS: dict[str, Callable[[Faults], Outcome | None]] = {
    "dead": Faults.dead_then_back,
    "readonly": Faults.read_only_spool,
    "full": Faults.full_spool,
    "corrupt": Faults.corrupt_record,
    "poison": Faults.poison_batch,
    "wrongurl": Faults.wrong_url,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--only", default=",".join(FAULTS), help="comma-separated: " + ", ".join(FAULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, format="  %(message)s")
    logging.getLogger("layerwatch").setLevel(logging.CRITICAL)  # the table says what happened
    acks = Acks()
    tmpfs = Tmpfs()
    with tempfile.TemporaryDirectory(prefix="lw-faults-") as name:
        tmp = Path(name)
        collector = Collector(tmp)
        faults = Faults(tmp, args.steps, args.every, collector, tmpfs)
        columns = f"{'trained':>7} {'acked':>6} {'dup':>4} {'stored':>6} {'lost':>5} {'counted':>8}"
        header = f"{'fault':30} {columns}  client counts, sync"
        print(header)
        print("-" * len(header))
        unaccounted = 0
        try:
            for key in args.only.split(","):
                started = time.monotonic()
                outcome = FAULTS[key](faults)
                if outcome is None:
                    print(f"{key:30} skipped: no tmpfs can be mounted here (needs root)")
                    continue
                acked, dup = acks.of(outcome.key)
                stored = collector.stored(outcome.key)
                lost = outcome.trained - stored
                unaccounted += lost != outcome.counted_steps
                counts = " ".join(f"{k}={v}" for k, v in outcome.counted.items() if v)
                print(
                    f"{outcome.fault:30} {outcome.trained:>7} {acked:>6} {dup:>4} {stored:>6} {lost:>5} "
                    f"{outcome.counted_steps:>8}  {counts or '-'}, sync {outcome.sync}"
                    f"  ({time.monotonic() - started:.1f} s)"
                )
                print(f"{'':30} tried: {outcome.tried}")
        finally:
            collector.stop()
            tmpfs.unmount_all()
    print(
        f"\nlost steps the client did not count: {'none' if not unaccounted else f'{unaccounted} fault(s)'}"
        f" (steps per batch: {args.every}; a shared machine, times are indicative)"
    )
    sys.exit(1 if unaccounted else 0)


if __name__ == "__main__":
    main()
