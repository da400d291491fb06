"""Wide batches: how long one batch at the collector's limits holds the database writer.

    python bench/wide_batch.py                       # ~1 min: SQLite and PostgreSQL
    python bench/wide_batch.py --backends sqlite

A batch "at the limit" carries ``MAX_SERIES`` (20,000) new layers and as many new parameters, and as many
steps of rows for all of them as ``MAX_ROWS`` (50,000 rows) allows: one. Two measurements per backend:

* in process, the collector's own ``Ingestor.write`` with the alert rules installed, as the server runs it: on
  SQLite the writer is held from its BEGIN IMMEDIATE to its commit, which is this call;
* against a real collector process, what another run's small batches, sent back to back meanwhile, waited:
  the longest of their round trips while the wide batch was in flight, next to their usual one.

Then a batch one layer over the limit, and the collector's answer to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from layerwatch import wire
from layerwatch_server.core.batch import MAX_ROWS, MAX_SERIES, Batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import collector, database  # the ingest bench's collector process and databases

HEADERS = {"Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "gzip"}


def wide_batch(key: str, n_layers: int, n_params: int, first_step: int, n_steps: int) -> dict:
    """``n_layers`` layers and ``n_params`` parameters named after ``key`` (new to the run), all reported in each
    of ``n_steps`` steps."""
    layer_row = [0.5] * len(wire.LAYER_STATS)
    param_row = [0.25] * len(wire.PARAM_STATS)
    return {
        "v": wire.VERSION,
        "run": {"key": key, "project": "wide"},
        "layers": [
            {"index": i, "name": f"model.experts.{i}.w1", "type": "Linear", "kind": "relu", "shape": [-1, 64]}
            for i in range(n_layers)
        ],
        "params": [{"index": i, "name": f"model.experts.{i}.w1.weight", "shape": [64, 64]} for i in range(n_params)],
        "steps": [
            {
                "step": step,
                "time": time.time(),
                "loss": 1.0,
                "layers": [[i, *layer_row] for i in range(n_layers)],
                "params": [[i, *param_row] for i in range(n_params)],
            }
            for step in range(first_step, first_step + n_steps)
        ],
    }


def at_the_limit(key: str, first_step: int = 0) -> dict:
    return wide_batch(key, MAX_SERIES, MAX_SERIES, first_step, MAX_ROWS // (2 * MAX_SERIES))


def in_process(url: str) -> list[tuple[str, float, float, int]]:
    """(what, seconds in Ingestor.write, of them on this thread's CPU, rows): a first wide batch (new series) and
    the next one (known), with the alert rules evaluated inside the transaction as the server does, then the
    same without them. SQLite does its work on the calling thread, so the CPU time is what the write takes on
    an idle core, whatever else the machine is doing."""
    from layerwatch_server.app import build_state
    from layerwatch_server.core.config import Settings
    from layerwatch_server.storage.ingest import Ingestor

    state = build_state(Settings(db_url=url, scheduler=False, mlflow_tracking_uri="off"))
    out = []
    steps = MAX_ROWS // (2 * MAX_SERIES)
    for rules, ingestor in (("with rules", state.ingestor), ("storage only", Ingestor(state.engine))):
        for what, first in (("new series", 0), ("known series", steps)):  # the next step(s) of the same run
            batch = Batch.model_validate(at_the_limit(f"in-process {rules}", first))
            start, cpu = time.perf_counter(), time.thread_time()
            res = ingestor.write(batch)
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
            out.append((f"{what}, {rules}", wall, cpu, res.layer_rows + res.param_rows))
    state.engine.dispose()
    return out


class Prober(threading.Thread):
    """Another run's small batches, back to back: (start, round-trip seconds, status) of each."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.samples, self.stop = base, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as http:
            step = 0
            while not self.stop.is_set():
                body = wire.encode(wide_batch("probe", 4, 4, step, 1))
                start = time.perf_counter()
                status = http.post("/api/v1/ingest", content=body, headers=HEADERS).status_code
                self.samples.append((start, time.perf_counter() - start, status))
                step += 1


def against_a_server(url: str, log: Path) -> dict[str, object]:
    with collector(url, log) as (base, _), httpx.Client(base_url=base, timeout=300) as http:
        body = wire.encode(at_the_limit("served"))
        prober = Prober(base)
        prober.start()
        deadline = time.monotonic() + 60
        while len(prober.samples) < 20 and time.monotonic() < deadline:  # its usual round trip, first
            time.sleep(0.05)
        start = time.perf_counter()
        resp = http.post("/api/v1/ingest", content=body, headers=HEADERS)
        took, end = time.perf_counter() - start, time.perf_counter()
        seen = len(prober.samples)
        while len(prober.samples) < seen + 2 and time.monotonic() < deadline:  # the one caught mid-batch returns
            time.sleep(0.05)
        prober.stop.set()
        prober.join()
        over = wide_batch("over", MAX_SERIES + 1, 0, 0, 1)
        refused = http.post("/api/v1/ingest", content=wire.encode(over), headers=HEADERS)
    before = [rt for t, rt, _ in prober.samples if t + rt < start]
    during = [rt for t, rt, _ in prober.samples if t < end and t + rt > start]
    return {
        "status": resp.status_code,
        "body_kb": len(body) / 1024,
        "request_s": took,
        "probe_usual_s": statistics.median(before) if before else float("nan"),
        "probe_worst_s": max(during, default=float("nan")),
        "probe_errors": sum(1 for _, _, s in prober.samples if s != 202),
        "over_status": refused.status_code,
        "over_detail": refused.json()["detail"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite,postgresql")
    args = ap.parse_args()
    steps = MAX_ROWS // (2 * MAX_SERIES)
    print(f"batch at the limit: {MAX_SERIES} new layers + {MAX_SERIES} new params, {steps} steps of rows for all")
    with tempfile.TemporaryDirectory(prefix="lw-wide-") as tmp:
        for backend in args.backends.split(","):
            with database(backend, Path(tmp)) as url:
                for what, wall, cpu, rows in in_process(url):
                    print(f"{backend:10s} Ingestor.write, {what:26s}: {wall:5.2f} s ({cpu:5.2f} s CPU) for {rows} rows")
            with database(backend, Path(tmp)) as url:
                r = against_a_server(url, Path(tmp) / f"{backend}.log")
            print(
                f"{backend:10s} served: {r['status']} in {r['request_s']:.2f} s ({r['body_kb']:.0f} KB gzip); "
                f"another run's small batch meanwhile waited at most {r['probe_worst_s']:.2f} s "
                f"(usually {r['probe_usual_s'] * 1000:.0f} ms; {r['probe_errors']} not 202)"
            )
            print(f"{backend:10s} one layer over the limit: {r['over_status']} {r['over_detail']!r}")


if __name__ == "__main__":
    main()
