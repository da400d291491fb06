"""A fleet on one PostgreSQL: N simulated jobs x ranks x layers against two collector replicas.

    python bench/fleet.py                                   # 8 jobs x 4 ranks x 100 layers, 20 s
    python bench/fleet.py --jobs 16 --ranks 8 --layers 200 --seconds 30

Creates a PostgreSQL database (dropped at the end), migrates it, starts two ``layerwatch-server serve``
replicas on loopback ports, and runs every rank of every job as a closed loop (send a batch of ``--steps``
steps, wait for the answer, send the next; back off on 429/503 as the client does) for ``--seconds``; job
``j`` talks to replica ``j % 2``. Prints what the pair stored (layer-rows/s), the latency of accepted
batches (p50/p99 over every rank), the 429s and 503s, each replica's CPU, and the database's growth per
layer-row, turned into bytes per day at the measured rate and per training GPU (``--report-s`` between a
GPU's reports). Everything runs on this machine: the figures are a floor for the machine's cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import collector, cpu_s, database, drive  # bench/ingest.py: the same simulated ranks and collector


def db_bytes(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        size = conn.scalar(text("SELECT pg_database_size(current_database())"))
    engine.dispose()
    return int(size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=4, help="ranks per job, each sending its own rows")
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10, help="steps per batch")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--report-s", type=float, default=1.0, help="seconds between one GPU's reports (per day)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lw-fleet-") as tmpdir:
        tmp = Path(tmpdir)
        with (
            database("postgresql", tmp) as url,
            collector(url, tmp / "replica-a.log") as (base_a, proc_a),
            collector(url, tmp / "replica-b.log") as (base_b, proc_b),
        ):
            replicas = [(base_a, proc_a.pid), (base_b, proc_b.pid)]
            size0, cpu0 = db_bytes(url), [cpu_s(pid) for _, pid in replicas]
            results: list[dict] = []
            lock = threading.Lock()

            def job(j: int) -> None:
                base, _ = replicas[j % 2]
                r = drive(base, args.ranks, args.seconds, args.layers, args.steps)
                with lock:
                    results.append(r)

            t0 = time.monotonic()
            threads = [threading.Thread(target=job, args=(j,)) for j in range(args.jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
            cpu = [cpu_s(pid) - c for (_, pid), c in zip(replicas, cpu0, strict=True)]
            grown = db_bytes(url) - size0
        rows = sum(r["rows"] for r in results)
        lat = sorted(x for r in results for x in r["latencies_s"])
        status: dict[int, int] = {}
        for r in results:
            for code, n in r["status"].items():
                status[code] = status.get(code, 0) + n
        rate = rows / elapsed
        per_row = grown / rows if rows else float("nan")
        gpu_rows_day = args.layers * 86400 / args.report_s  # one rank's layer-rows per day
        print(
            f"fleet: {args.jobs} jobs x {args.ranks} ranks x {args.layers} layers, {args.steps} steps per batch, "
            f"2 replicas on one PostgreSQL, {elapsed:.0f} s"
        )
        print(
            f"stored {rate:,.0f} layer-rows/s; accepted batches p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
            f"p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.0f} ms; 429s {status.get(429, 0)}, "
            f"503s {status.get(503, 0)}, statuses {status}"
        )
        print(
            f"replica CPU: {cpu[0]:.1f} s + {cpu[1]:.1f} s = {rows / sum(cpu):,.0f} layer-rows per replica CPU-s"
        )
        print(
            f"database grew {grown / 2**20:,.0f} MiB = {per_row:.0f} bytes per layer-row (all tables): "
            f"{rate * per_row * 86400 / 2**30:,.0f} GiB/day at this rate; one GPU reporting {args.layers} layers "
            f"every {args.report_s:g} s: {gpu_rows_day * per_row / 2**30:.2f} GiB/day"
        )


if __name__ == "__main__":
    main()
