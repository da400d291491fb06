"""Ingest benchmark: a real collector process, simulated training jobs, and MLflow for comparison.

    python bench/ingest.py             # ~2 min: SQLite + PostgreSQL, 1/8/64 clients, MLflow, overload
    python bench/ingest.py --seconds 30 --mlflow-seconds 30 --backends sqlite

Each client is one rank of one run sending batches of ``--layers`` layers x ``--steps`` steps built with
``layerwatch.wire.encode``. A layer-row is one layer at one step with all its statistics. The MLflow
phase logs the same statistics (one metric per layer and statistic) through ``MlflowClient.log_batch``
(1000 metrics per request) to a real ``mlflow server``. The overload phase offers 3x the collector's
in-flight limit and samples its RSS while it sheds load with 429/503. The yardstick phase first times
plain ``sqlite3`` executemany into the same table, the issue's reference figure, so SQLite results can be read
as a share of what this machine's SQLite does at all.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx

from layerwatch import wire

MIRROR_ENV: dict[str, str] = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off"}  # --mirror clears it
PG_ADMIN = os.environ.get("LAYERWATCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def collector(db_url: str, log: Path, **env: str):
    port = free_port()
    cmd = [sys.executable, "-m", "layerwatch_server.cli", "serve", "--port", str(port), "--db", db_url]
    full_env = {**os.environ, "LAYERWATCH_NO_AUTH": "1", "LAYERWATCH_LOG_LEVEL": "warning", **MIRROR_ENV, **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def database(backend: str, tmp: Path):
    from sqlalchemy import create_engine, text

    from layerwatch_server.storage.migrations import upgrade

    if backend == "sqlite":
        url = f"sqlite:///{tmp}/bench-{uuid.uuid4().hex[:6]}.db"
        upgrade(url)
        yield url
        return
    name = f"lw_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Job:
    """One rank of one simulated run: realistic batches, steps always increasing."""

    def __init__(self, run_key: str, rank: int, world: int, layers: int, steps: int) -> None:
        self.rank, self.steps, self.next_step = rank, steps, 0
        rnd = random.Random(rank)
        self.head = {
            "v": wire.VERSION,
            "run": {"key": run_key, "name": run_key, "project": "bench", "world_size": world, "config": None},
            "rank": rank,
            "host": "bench",
            "pid": os.getpid(),
            "seq": 0,
            "layers": [
                {
                    "index": i,
                    "name": f"model.blocks.{i}.mlp",
                    "type": "Linear",
                    "kind": "relu",
                    "shape": [-1, 1024],
                    "units": 1024,
                }
                for i in range(layers)
            ],
            "params": [],
            "layer_stats": list(wire.LAYER_STATS),
            "param_stats": list(wire.PARAM_STATS),
            "nonfinite_origin": None,
            "end": None,
            "dropped": {"reports": 0, "batches": 0},
        }
        # What the client sends for a healthy ReLU-family layer: dead_frac only at the window's last step and
        # low (a few units dead), the same on every rank (the client reduces it across ranks), no sat_frac
        # (unbounded), no NaN/Inf. The other statistics differ per rank.
        shared = random.Random(run_key)
        made = {"sat_frac": None, "nonfinite": 0.0}
        self.values = [[i, *(made.get(s, rnd.random()) for s in wire.LAYER_STATS)] for i in range(layers)]
        dead = wire.LAYER_STATS.index("dead_frac") + 1
        for row in self.values:
            row[dead] = shared.random() * 0.1
        self.mid_window = [[*row[:dead], None, *row[dead + 1 :]] for row in self.values]

    def batch(self) -> tuple[bytes, list[dict]]:
        steps = []
        for s in range(self.next_step, self.next_step + self.steps):
            steps.append(
                {
                    "step": s,
                    "time": time.time(),
                    "loss": 1.0 / (s + 1),
                    "lr": 1e-3,
                    "grad_norm_total": 1.0,
                    "scalars": {},
                    "layers": self.values if s == self.next_step + self.steps - 1 else self.mid_window,
                    "params": [],
                }
            )
        self.next_step += self.steps
        self.head["seq"] += 1
        return wire.encode({**self.head, "steps": steps}), steps


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(base: str, clients: int, seconds: float, layers: int, steps: int, pid: int | None = None) -> dict:
    """``clients`` concurrent ranks for ``seconds``: rows/s, latency percentiles, status counts, and
    (with the collector's ``pid``) layer-rows per collector CPU-second, which the load generator's own
    share of this machine's cores does not distort."""
    cpu0 = cpu_s(pid) if pid else 0.0
    run_key = f"bench-{uuid.uuid4().hex[:6]}"
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    lat: list[float] = []
    counts: dict[int, int] = {}
    rows = [0]
    headers = {"Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "gzip"}

    host, port = base.removeprefix("http://").split(":")

    def worker(rank: int) -> None:
        # http.client, not httpx: the load generator shares the machine's cores with the collector.
        job = Job(run_key, rank, clients, layers, steps)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body, _ = job.batch()
        try:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                conn.request("POST", "/api/v1/ingest", body=body, headers=headers)
                r = conn.getresponse()
                answer = r.read()
                dt = time.perf_counter() - t0
                with lock:
                    counts[r.status] = counts.get(r.status, 0) + 1
                    if r.status == 202:
                        lat.append(dt)
                        rows[0] += json.loads(answer)["accepted"]["layer_rows"]
                if r.status == 202:
                    body, _ = job.batch()
                else:
                    time.sleep(float(r.getheader("Retry-After") or 1) * random.random())
        finally:
            conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(r,)) for r in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    server_cpu = (cpu_s(pid) - cpu0) if pid else float("nan")
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
    return {
        "run_key": run_key,
        "rows_s": rows[0] / elapsed,
        "rows_per_cpu_s": rows[0] / server_cpu if server_cpu else float("nan"),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "status": counts,
        "latencies_s": lat,
        "rows": rows[0],
    }


def mlflow_rate(tmp: Path, seconds: float, layers: int, clients: int = 1) -> float:
    """Layer-rows/s through a real MLflow server (7 metrics per layer-row, 1000 metrics per log_batch)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{tmp}/mlflow.db",
        "--default-artifact-root",
        str(tmp / "art"),
        "--workers",
        "1",
    ]
    with open(tmp / "mlflow.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        exp = client.create_experiment(f"bench-{uuid.uuid4().hex[:6]}")
        sent = [0]
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def worker() -> None:
            run_id = client.create_run(exp).info.run_id
            step, pending = 0, []
            while time.monotonic() < stop:
                now = int(time.time() * 1000)
                pending += [
                    Metric(f"model.blocks.{i}.mlp/{s}", random.random(), now, step)
                    for i in range(layers)
                    for s in wire.LAYER_STATS
                ]
                step += 1
                while len(pending) >= 1000 and time.monotonic() < stop:
                    client.log_batch(run_id, metrics=pending[:1000])
                    pending = pending[1000:]
                    with lock:
                        sent[0] += 1000

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sent[0] / (time.monotonic() - t0) / len(wire.LAYER_STATS)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def raw_sqlite_rate(url: str, seconds: float, layers: int, steps: int) -> float:
    """The issue's yardstick on this machine: plain ``sqlite3`` executemany of pre-built rows into the
    collector's own (migrated, indexed, WAL) ``layer_stats`` table, one commit per batch, no HTTP and no
    decoding. Its figure on the machine the issue was written on is ~230k rows/s, so the collector's share of
    it says how the result would read there."""
    import sqlite3

    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    columns = ["run_id", "layer_id", "rank", "step", *wire.LAYER_STATS]
    sql = f"INSERT INTO layer_stats ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    rnd = random.Random(0)
    values = [rnd.random() for _ in wire.LAYER_STATS]
    rows, step, spent = 0, 0, 0.0
    while spent < seconds:
        batch = [("rawbench", layer, 0, step + s, *values) for s in range(steps) for layer in range(layers)]
        step += steps
        t0 = time.perf_counter()  # building the rows is not the database's work
        db.executemany(sql, batch)
        db.commit()
        spent += time.perf_counter() - t0
        rows += len(batch)
    db.close()
    return rows / spent


def raw_copy_rate(url: str, seconds: float, layers: int, steps: int) -> float:
    """The PostgreSQL yardstick: psycopg ``COPY`` of pre-built rows into the collector's own (migrated,
    indexed) ``layer_stats`` table, one transaction per batch of the same size the clients send, no HTTP,
    no decoding, no step claiming: what this machine's PostgreSQL takes at all from one connection."""
    import psycopg

    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    columns = ["run_id", "layer_id", "rank", "step", "day", *wire.LAYER_STATS]  # day: the partition, as ingest's
    sql = f"COPY layer_stats ({', '.join(columns)}) FROM STDIN"
    rnd = random.Random(0)
    values = [rnd.random() for _ in wire.LAYER_STATS]
    day = int(time.time() // 86400)
    rows, step, spent = 0, 0, 0.0
    while spent < seconds:
        batch = [("rawbench", layer, 0, step + s, day, *values) for s in range(steps) for layer in range(layers)]
        step += steps
        t0 = time.perf_counter()
        with conn.cursor() as cur, cur.copy(sql) as copy:
            for row in batch:
                copy.write_row(row)
        conn.commit()
        spent += time.perf_counter() - t0
        rows += len(batch)
    conn.close()
    return rows / spent


def stored_bytes_per_row(url: str) -> tuple[float, int]:
    """(bytes per stored layer-row, rows): the ``layer_stats`` table with its indexes, over its rows."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.scalar(text("SELECT count(*) FROM layer_stats"))
        if engine.dialect.name == "postgresql":
            # its partitions (the partitioned table itself holds no rows)
            size = conn.scalar(text("SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('layer_stats')"))
        else:  # dbstat: the pages of the table and its indexes (the WAL is checkpointed at shutdown)
            size = conn.scalar(text("SELECT sum(pgsize) FROM dbstat WHERE name LIKE '%layer_stats%'"))
    engine.dispose()
    return (size / n if n else float("nan")), n


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def mirror_cursor(url: str, run_key: str) -> tuple[int | None, int | None]:
    """(the run's last step, the last step the MLflow mirror sent) of the run with ``run_key``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT r.last_step, m.last_step FROM runs r LEFT JOIN mlflow_mirror m ON m.run_id = r.id "
                "WHERE r.key = :k"
            ),
            {"k": run_key},
        ).first()
    engine.dispose()
    return (row[0], row[1]) if row else (None, None)


def mirror_phase(tmp: Path, seconds: float, layers: int, steps: int) -> None:
    """The embedded default collector (SQLite, MLflow mirror into a SQLite MLflow store) with the mirror off,
    then on, one client of ``layers`` layers: ingest rate side by side (after a first run has been mirrored,
    so MLflow's import is not part of it), then how long the mirror (its own process) takes to catch up with
    everything ingested, and the metric keys the run got in MLflow."""
    from mlflow.tracking import MlflowClient

    rates = {}
    saved = dict(MIRROR_ENV)
    for mode in ("off", "on"):
        MIRROR_ENV.clear()
        MIRROR_ENV.update(saved if mode == "off" else {})
        with database("sqlite", tmp) as url, collector(url, tmp / f"mirror-{mode}.log") as (base, proc):
            warm = drive(base, 1, 0.2, layers, steps)  # the mirror's first run: imports MLflow, makes the experiment
            deadline = time.monotonic() + 90
            while mode == "on" and len(set(mirror_cursor(url, warm["run_key"]))) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            r = drive(base, 1, seconds, layers, steps, pid=proc.pid)
            rates[mode] = r["rows_s"]
            line = (
                f"mirror {mode:3s} sqlite clients=  1 layers={layers}  {r['rows_s']:10,.0f} layer-rows/s  "
                f"({r['rows_per_cpu_s']:,.0f} per collector CPU-s)  p99={r['p99_ms']:.1f} ms"
            )
            if mode == "on":
                kids = children(proc.pid)
                t0 = time.monotonic()
                last, sent = mirror_cursor(url, r["run_key"])
                while sent != last and time.monotonic() - t0 < 300:
                    time.sleep(0.2)
                    last, sent = mirror_cursor(url, r["run_key"])
                behind = time.monotonic() - t0
                steps_s = ((sent or -1) + 1) / (seconds + behind)
                store = f"sqlite:///{Path(url.removeprefix('sqlite:///')).parent / 'mlflow.db'}"
                ml = MlflowClient(tracking_uri=store)
                keys = len(ml.search_runs(ml.get_experiment_by_name("bench").experiment_id)[0].data.metrics)
                line += (
                    f"; mirror at step {sent} of {last} {behind:.1f} s after the last batch: {steps_s:.1f} steps/s "
                    f"of {keys} metric keys ({steps_s * keys:,.0f} metrics/s), mirror process CPU "
                    f"{sum(cpu_s(k) for k in kids):.1f} s"
                )
            print(line, flush=True)
    MIRROR_ENV.clear()
    MIRROR_ENV.update(saved)
    print(f"mirror on / off ingest = {rates['on'] / rates['off']:.2f}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def overload(base: str, pid: int, seconds: float, limit: int, layers: int, steps: int) -> dict:
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(rss_mb(pid))

    before = rss_mb(pid)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        res = drive(base, 3 * limit, seconds, layers, steps)
    finally:
        done.set()
        sampler.join()
    return {
        **res,
        "rss_before_mb": before,
        "rss_max_mb": max(samples or [before]),
        "rss_after_mb": rss_mb(pid),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level")
    ap.add_argument("--layers", type=int, default=50)
    ap.add_argument("--steps", type=int, default=10, help="steps per batch")
    ap.add_argument("--mlflow-seconds", type=float, default=10.0, help="0 skips MLflow")
    ap.add_argument("--overload-seconds", type=float, default=10.0, help="0 skips the overload phase")
    ap.add_argument("--max-inflight", type=int, default=16, help="collector limit during the overload phase")
    ap.add_argument("--mirror-seconds", type=float, default=8.0, help="mirror on vs off phase; 0 skips it")
    ap.add_argument("--mirror-layers", type=int, default=200, help="layers of the run in the mirror phase")
    ap.add_argument(
        "--mirror",
        action="store_true",
        help="keep the collector's MLflow mirror on (the embedded default: an in-process SQLite MLflow store "
        "sharing the collector's CPU); off by default, as in production where MLflow is a server of its own",
    )
    args = ap.parse_args()
    if args.mirror:
        MIRROR_ENV.clear()

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmpdir:
        tmp = Path(tmpdir)
        raw = 0.0
        if "sqlite" in args.backends.split(","):
            with database("sqlite", tmp) as url:
                raw = raw_sqlite_rate(url, 5.0, args.layers, args.steps)
            print(f"yardstick  raw sqlite3 executemany into layer_stats: {raw:,.0f} rows/s (issue's machine: ~230k)")
        for backend in args.backends.split(","):
            copy_raw = 0.0
            if backend == "postgresql":
                with database(backend, tmp) as url:
                    copy_raw = raw_copy_rate(url, 5.0, args.layers, args.steps)
                print(f"yardstick  raw psycopg COPY into layer_stats: {copy_raw:,.0f} rows/s", flush=True)
            with database(backend, tmp) as url, collector(url, tmp / f"{backend}.log") as (base, proc):
                for c in (int(x) for x in args.clients.split(",")):
                    r = drive(base, c, args.seconds, args.layers, args.steps, pid=proc.pid)
                    results[f"{backend}/{c}"] = r["rows_s"]
                    yard, what = (raw, "raw sqlite3") if backend == "sqlite" else (copy_raw, "raw COPY")
                    share = f"  = {r['rows_s'] / yard:.0%} of {what}" if yard else ""
                    print(
                        f"{backend:10s} clients={c:3d}  {r['rows_s']:10,.0f} layer-rows/s{share}  "
                        f"({r['rows_per_cpu_s']:,.0f} per collector CPU-s)  "
                        f"p50={r['p50_ms']:7.1f} ms  p99={r['p99_ms']:7.1f} ms  status={r['status']}",
                        flush=True,
                    )
                per_row, n = stored_bytes_per_row(url)
                print(f"{backend:10s} stored: {per_row:,.0f} bytes per layer-row (layer_stats with its indexes, {n:,})")
        if args.mirror_seconds > 0:
            mirror_phase(tmp, args.mirror_seconds, args.mirror_layers, args.steps)
        if args.mlflow_seconds > 0:
            m = mlflow_rate(tmp, args.mlflow_seconds, args.layers)
            metrics = m * len(wire.LAYER_STATS)
            print(f"mlflow     clients=  1  {m:10,.0f} layer-rows/s ({metrics:,.0f} metrics/s)")
            for key, v in results.items():
                print(f"ratio layerwatch {key} / mlflow = {v / m:,.0f}x")
        if args.overload_seconds > 0:
            backend = args.backends.split(",")[0]
            with (
                database(backend, tmp) as url,
                collector(url, tmp / "overload.log", LAYERWATCH_MAX_INFLIGHT=str(args.max_inflight)) as (
                    base,
                    proc,
                ),
            ):
                drive(base, 4, 2, args.layers, args.steps)  # warm-up
                o = overload(base, proc.pid, args.overload_seconds, args.max_inflight, args.layers, args.steps)
                print(
                    f"overload   {backend} clients={3 * args.max_inflight} (3x limit {args.max_inflight}): "
                    f"{o['rows_s']:,.0f} layer-rows/s  status={o['status']}  "
                    f"RSS before={o['rss_before_mb']:.0f} MB max={o['rss_max_mb']:.0f} MB "
                    f"after={o['rss_after_mb']:.0f} MB"
                )


if __name__ == "__main__":
    main()
