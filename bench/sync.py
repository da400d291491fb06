"""`layerwatch sync` of an offline run against the embedded default collector: layer-rows/s for the whole command.

    python bench/sync.py                       # 5 rounds of 4 settings, a fresh collector each: ~3-5 min here
    python bench/sync.py --repeats 1 --mirror off

The run is made by the real client in offline mode (a 50-block Linear+ReLU MLP: 100 watched layers, 100
parameters, ``every=10``). Each measurement copies its spool, starts a fresh ``layerwatch-server serve`` on a new
SQLite database (the embedded default: the MLflow mirror on, or ``LAYERWATCH_MLFLOW_TRACKING_URI=off``), sends it
one small batch of another run (a collector that has been up a while), and times the ``layerwatch sync`` process
from start to exit (interpreter start-up included), with one batch in flight and with ``--in-flight N`` (the
default, 4), the settings in turn within each round. The stored layer rows are counted in the database afterwards,
and the alert rules' memory of the run is read back: a figure counts only when every row arrived and the rules
judged every step in training order (their loss history is the run's last 100 losses, in order). Beside the times:
the CPU seconds of the sync process, of the collector process, and of the collector's child processes (the MLflow
mirror, where it runs in a process of its own). On a shared machine the wall times drift with the neighbours' load;
the CPU seconds do not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import collector  # the ingest bench's collector process

from layerwatch import wire
from layerwatch.spool import read_records
from layerwatch.transport import post_batch
from layerwatch_server.storage.migrations import upgrade

LAYERWATCH = str(Path(sys.executable).with_name("layerwatch"))


def offline_run(spool: Path, blocks: int, steps: int, every: int) -> int:
    """Train a ``blocks`` x (Linear, ReLU) MLP for ``steps`` steps in offline mode; the layer rows it spooled."""
    import layerwatch

    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(blocks) for m in (nn.Linear(16, 16), nn.ReLU())))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = layerwatch.watch(model, run_name="bench-sync", mode="offline", spool_dir=str(spool), every=every)
    for _ in range(steps):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss=loss)
    mon.close()
    return len(mon.recorder.layers) * steps


def stored_layer_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM layer_stats").fetchone()[0]


def judged_in_order(db: Path, steps: int) -> bool:
    """Whether the rules judged the run's every step, in training order: their memory's last step is the run's last,
    and their loss history (the last 100 losses, 6 significant digits) is the stored losses' tail, in step order."""
    with sqlite3.connect(db) as conn:
        run_id, data = conn.execute(
            "SELECT r.id, s.data FROM runs r JOIN rule_state s ON s.run_id = r.id WHERE r.key != 'warm-up'"
        ).fetchone()
        ordered = conn.execute("SELECT loss FROM step_stats WHERE run_id = ? ORDER BY step", (run_id,))
        losses = [loss for (loss,) in ordered]
    memory = json.loads(data)
    history = [float(f"{loss:.6g}") for loss in losses[-100:]]
    return memory.get("last_step") == steps - 1 and memory.get("loss_spike", history) == history


@dataclass
class Sync:
    seconds: float  # the whole `layerwatch sync` command, start to exit
    client_cpu: float  # CPU seconds of the sync process
    collector_cpu: float  # CPU seconds the collector process spent meanwhile
    mirror_cpu: float  # ... and its child processes (the MLflow mirror, where it runs apart)


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``'s live children (the collector's MLflow mirror, where it runs in a process of its own)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(_stat(int(entry.name))[1]) == pid:
                total += cpu_seconds(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total


def settled(pid: int, window: float = 1.0, deadline: float = 120.0) -> None:
    """Wait until the collector's children (the mirror, spawned at start-up: an interpreter and MLflow to import,
    then a first tick) use under a tenth of a core."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        before = children_cpu_seconds(pid)
        time.sleep(window)
        if children_cpu_seconds(pid) - before < 0.1 * window:
            return
    raise RuntimeError("the collector's child processes did not settle")


def warm_up(url: str) -> None:
    """One small batch of another run: a collector that has been up a while has its ingest path loaded."""
    step = {"step": 0, "time": time.time(), "loss": 1.0}
    batch = {"v": wire.VERSION, "run": {"key": "warm-up", "project": "warm-up"}, "steps": [step]}
    answer = post_batch(url, wire.encode(batch), None, 30)
    if not answer.ok:
        raise RuntimeError(f"warm-up batch refused: {answer.error}")


def measure(spool: Path, tmp: Path, mirror: bool, in_flight: int, expected: int, steps: int) -> Sync:
    """One `layerwatch sync` of a copy of ``spool`` into a fresh collector."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    shutil.copytree(spool, work / "spool")
    db = work / "layerwatch.db"
    upgrade(f"sqlite:///{db}")  # what `serve` does to a new default database
    # the embedded default's mirror: an MLflow SQLite store next to the database (set here: the ingest bench's
    # collector() turns the mirror off unless told)
    env = {"LAYERWATCH_MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}" if mirror else "off"}
    with collector(f"sqlite:///{db}", work / "collector.log", **env) as (url, proc):
        warm_up(url)
        settled(proc.pid)
        before, apart = cpu_seconds(proc.pid), children_cpu_seconds(proc.pid)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(
            [LAYERWATCH, "sync", str(work / "spool"), "--url", url, "--in-flight", str(in_flight)],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        collector_cpu = cpu_seconds(proc.pid) - before
        mirror_cpu = children_cpu_seconds(proc.pid) - apart
    if done.returncode != 0:
        raise RuntimeError(f"sync exited {done.returncode}: {done.stderr}")
    stored = stored_layer_rows(db)
    if stored != expected:
        raise RuntimeError(f"{stored} layer rows stored, {expected} expected")
    if not judged_in_order(db, steps):
        raise RuntimeError(f"the alert rules did not judge every step in order ({in_flight} in flight)")
    shutil.rmtree(work, ignore_errors=True)
    client_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return Sync(seconds, client_cpu, collector_cpu, mirror_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=50, help="Linear+ReLU blocks (two watched layers each)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--in-flight", type=int, default=4, help="batches in flight for the concurrent sync")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each measures every setting once, in turn")
    parser.add_argument("--mirror", choices=["on", "off", "both"], default="both")
    args = parser.parse_args()

    mirrors = {"on": [True], "off": [False], "both": [True, False]}[args.mirror]
    settings = [(mirror, n) for mirror in mirrors for n in (1, args.in_flight)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = offline_run(tmp / "run", args.blocks, args.steps, args.every)
        batches = sum(1 for seg in (tmp / "run").rglob("*.lws") for _ in read_records(seg))
        print(f"offline run: {2 * args.blocks} layers x {args.steps} steps = {rows:,} layer rows in {batches} batches")
        results: dict[tuple[bool, int], list[Sync]] = {s: [] for s in settings}
        for _ in range(args.repeats):  # settings side by side in each round: the machine's load drifts alike
            for mirror, n in settings:
                results[mirror, n].append(measure(tmp / "run", tmp, mirror, n, rows, args.steps))
    print(
        f"{'MLflow mirror':<14}{'in flight':>10}{'median s':>10}{'layer-rows/s':>14}{'best s':>8}{'layer-rows/s':>14}"
        f"{'sync CPU s':>12}{'collector CPU s':>17}{'its children':>14}"
    )
    medians: dict[tuple[bool, int], float] = {}
    for mirror in mirrors:
        for n in (1, args.in_flight):
            runs = results[mirror, n]
            medians[mirror, n] = median = statistics.median(r.seconds for r in runs)
            best = min(r.seconds for r in runs)
            print(
                f"{'on' if mirror else 'off':<14}{n:>10}{median:>10.2f}{rows / median:>14,.0f}{best:>8.2f}"
                f"{rows / best:>14,.0f}{statistics.median(r.client_cpu for r in runs):>12.2f}"
                f"{statistics.median(r.collector_cpu for r in runs):>17.2f}"
                f"{statistics.median(r.mirror_cpu for r in runs):>14.2f}"
            )
        print(f"{'':<14}{'speed-up':>10}{medians[mirror, 1] / medians[mirror, args.in_flight]:>9.2f}x (medians)")
    if len(mirrors) == 2:  # what the mirror costs the sync, from the same rounds
        for n in (1, args.in_flight):
            print(f"mirror on / off, {n} in flight: {medians[False, n] / medians[True, n]:.2f}x the rate (medians)")


if __name__ == "__main__":
    main()
