"""MLflow mirror: how fast stored layer-rows reach MLflow, and what the mirror costs ingest beside it.

    python bench/mlflow_mirror.py                         # throughput: 1 run, 50 layers x 1,000 steps
    python bench/mlflow_mirror.py --layers 200 --steps 500
    python bench/mlflow_mirror.py --beside-ingest         # mirror off vs on, 200 layers: ~3 min
    python bench/mlflow_mirror.py --beside-ingest --seconds 10 --repeats 1

Throughput: ingests the run into a fresh SQLite collector database (in-process), then calls the mirror's
scheduler job until the run's cursor reaches its last step, against a real MLflow server on a loopback port.
Prints the layer-rows and MLflow metrics per second, and how many metric keys the run got in MLflow (the budget).

Beside ingest: a ``layerwatch-server serve`` on a fresh SQLite database, the embedded default (its mirror a
process of its own writing to a SQLite MLflow store next to the database), with the mirror off and on in turn,
``--repeats`` rounds. In each: one client sends a ``--layers``-layer run (each layer and parameter as the client
sends them) as fast as the collector takes it (flood), then one at ``--rate`` steps/s (paced). Prints ingest
layer-rows/s, the collector's and the mirror's CPU seconds per 1,000 stored layer-rows, the mirror's lag (steps
and seconds behind, the worst sampled while the run was sending) and how long it took to catch up after.
The ratio of the flood rates, on / off, is how much the mirror slows ingest.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the real-server fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ingest bench's collector and jobs

from ingest import MIRROR_ENV, Job, children, collector, cpu_s, database, mirror_cursor
from sqlalchemy import select

from layerwatch import wire
from layerwatch_server.core.batch import Batch
from layerwatch_server.core.config import Settings
from layerwatch_server.mirrors import mlflow_mirror, source
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.migrations import upgrade
from layerwatch_server.storage.models import Run
from tests.service.batches import make_batch
from tests.service.mlflow_server import running_mlflow

CATCH_UP_WAIT_S = 120.0


def throughput(layers: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db = f"sqlite:///{tmp / 'lw.db'}"
        upgrade(db)
        engine = make_engine(db)
        ingestor = Ingestor(engine)
        for start in range(0, steps, 10):
            ingestor.write(Batch.model_validate(make_batch("mirror", steps=range(start, start + 10), n_layers=layers)))
        (tmp / "mlflow").mkdir()
        with running_mlflow(tmp / "mlflow") as uri:
            mirror = mlflow_mirror.from_settings(Settings(db_url=db, mlflow_tracking_uri=uri))
            assert mirror is not None
            start_t = time.perf_counter()
            while source.pending_runs(engine, 1):
                mirror.tick(engine)
            elapsed = time.perf_counter() - start_t
            with engine.connect() as conn:
                mlflow_run_id = conn.scalar(select(Run.mlflow_run_id))
            keys = len(mirror.client.get_run(mlflow_run_id).data.metrics)
        rows = layers * steps
        print(
            f"mirrored {steps} steps x {layers} layers in {elapsed:.1f} s: "
            f"{rows / elapsed:,.0f} layer-rows/s, "
            f"{mirror.metrics_total / elapsed:,.0f} MLflow metrics/s, {mirror.requests_total} log_batch requests, "
            f"{keys} metric keys in the MLflow run (budget: dead_frac and act_std per layer, grad_norm per param)"
        )


class ModelJob(Job):
    """The ingest bench's rank with a parameter per layer, as the client sends a model's (grad_norm & co.)."""

    def __init__(self, run_key: str, layers: int, steps: int) -> None:
        super().__init__(run_key, 0, 1, layers, steps)
        self.head["params"] = [
            {"index": i, "name": f"model.blocks.{i}.mlp.weight", "shape": [1024, 1024], "numel": 1 << 20}
            for i in range(layers)
        ]
        healthy = {"grad_nonfinite": 0.0}  # no NaN/Inf gradients; the other statistics some value
        self.param_rows = [[i, *(healthy.get(s, 0.5 + i / layers) for s in wire.PARAM_STATS)] for i in range(layers)]

    def batch(self) -> tuple[bytes, list[dict]]:
        _, steps = super().batch()
        for s in steps:
            s["params"] = self.param_rows
        return wire.encode({**self.head, "steps": steps}), steps


@dataclass
class Phase:
    rows_s: float
    collector_cpu_k: float  # collector CPU seconds per 1,000 stored layer-rows
    mirror_cpu_k: float  # the mirror process's, per 1,000 layer-rows stored in the phase
    worst_lag_steps: int = 0
    worst_lag_s: float = 0.0
    catch_up_s: float = 0.0
    behind: list[tuple[float, int, int]] = field(default_factory=list)


def send(base: str, job: Job, seconds: float, rate: float | None) -> tuple[str, int, float]:
    """One rank sending for ``seconds``: as fast as accepted, or ``rate`` steps/s. (run key, layer-rows, s)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "gzip"}
    rows, t0 = 0, time.monotonic()
    try:
        while (now := time.monotonic()) < t0 + seconds:
            if rate is not None and job.next_step / rate > now - t0:
                time.sleep(min(job.next_step / rate - (now - t0), t0 + seconds - now))
                continue
            body, steps = job.batch()
            conn.request("POST", "/api/v1/ingest", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 202:
                raise RuntimeError(f"ingest answered {r.status}")
            rows += sum(len(s["layers"]) for s in steps)
    finally:
        conn.close()
    return job.head["run"]["key"], rows, time.monotonic() - t0


def phase(base: str, url: str, pid: int, mirror: bool, layers: int, seconds: float, rate: float | None) -> Phase:
    """One run sent beside the mirror (or without it): rates, CPU, and the mirror's lag while and after."""
    kids = children(pid)
    cpu0, kid0 = cpu_s(pid), sum(cpu_s(k) for k in kids)
    key = f"bench-{uuid.uuid4().hex[:6]}"
    behind: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(0.5):
            last, sent = mirror_cursor(url, key)
            if last is not None:
                behind.append((time.monotonic() - t0, last, -1 if sent is None else sent))

    sampler = threading.Thread(target=sample)
    if mirror:
        sampler.start()
    try:
        _, rows, elapsed = send(base, ModelJob(key, layers, 10), seconds, rate)
    finally:
        done.set()
        if mirror:
            sampler.join()
    collector_cpu = cpu_s(pid) - cpu0
    out = Phase(rows / elapsed, 1000 * collector_cpu / rows, 0.0, behind=behind)
    if mirror:
        t0 = time.monotonic()
        last, sent = mirror_cursor(url, key)
        while sent != last and time.monotonic() - t0 < CATCH_UP_WAIT_S:
            time.sleep(0.1)
            last, sent = mirror_cursor(url, key)
        out.catch_up_s = time.monotonic() - t0 if sent == last else float("inf")
        out.mirror_cpu_k = 1000 * (sum(cpu_s(k) for k in kids) - kid0) / rows
        steps_s = rate or (rows / elapsed / layers)
        out.worst_lag_steps = max((last - sent for _, last, sent in behind), default=0)
        out.worst_lag_s = out.worst_lag_steps / steps_s
    return out


def beside_ingest(layers: int, seconds: float, repeats: int, rate: float) -> None:
    saved = dict(MIRROR_ENV)
    results: dict[tuple[str, str], list[Phase]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp_name:
            tmp = Path(tmp_name)
            for _ in range(repeats):
                for mode in ("off", "on"):
                    MIRROR_ENV.clear()
                    MIRROR_ENV.update(saved if mode == "off" else {})
                    with database("sqlite", tmp) as url, collector(url, tmp / f"{mode}.log") as (base, proc):
                        if mode == "on":  # the mirror's first run: imports MLflow, makes the experiment
                            key, _, _ = send(base, ModelJob(f"warm-{uuid.uuid4().hex[:6]}", layers, 10), 0.5, None)
                            deadline = time.monotonic() + 120
                            while len(set(mirror_cursor(url, key))) > 1 and time.monotonic() < deadline:
                                time.sleep(0.2)
                        for load, r in (("flood", None), ("paced", rate)):
                            p = phase(base, url, proc.pid, mode == "on", layers, seconds, r)
                            results.setdefault((mode, load), []).append(p)
                            print(_line(mode, load, layers, p, r), flush=True)
    finally:
        MIRROR_ENV.clear()
        MIRROR_ENV.update(saved)
    print("medians:")
    for (mode, load), ps in results.items():
        med = Phase(
            *(statistics.median(getattr(p, f) for p in ps) for f in Phase.__dataclass_fields__ if f != "behind")
        )
        print(_line(mode, load, layers, med, rate if load == "paced" else None), flush=True)
    on = [p.rows_s for p in results["on", "flood"]]
    off = [p.rows_s for p in results["off", "flood"]]
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(on, off, strict=True))
    print(f"ingest mirror on / off (flood, {layers} layers): {statistics.median(on) / statistics.median(off):.2f} "
          f"(rounds: {ratios})")  # fmt: skip


def _line(mode: str, load: str, layers: int, p: Phase, rate: float | None) -> str:
    what = f"{load} {layers} layers" + (f" at {rate:g} steps/s" if rate else "")
    line = f"mirror {mode:3s} {what:<28} {p.rows_s:9,.0f} layer-rows/s  collector {p.collector_cpu_k:.3f} CPU-s/1k rows"
    if mode == "on":
        line += (
            f", mirror {p.mirror_cpu_k:.3f} CPU-s/1k rows; worst lag {p.worst_lag_steps:.0f} steps "
            f"({p.worst_lag_s:.1f} s), caught up {p.catch_up_s:.1f} s after the last batch"
        )
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="default: 50 (throughput), 200 (beside ingest)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--beside-ingest", action="store_true", help="mirror off vs on beside a collector's ingest")
    ap.add_argument("--seconds", type=float, default=15.0, help="beside ingest: seconds of each load")
    ap.add_argument("--repeats", type=int, default=3, help="beside ingest: rounds of off, on")
    ap.add_argument("--rate", type=float, default=20.0, help="beside ingest: steps/s of the paced run")
    args = ap.parse_args()
    if args.beside_ingest:
        beside_ingest(args.layers or 200, args.seconds, args.repeats, args.rate)
    else:
        throughput(args.layers or 50, args.steps)


if __name__ == "__main__":
    main()
