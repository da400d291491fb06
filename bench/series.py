"""Series query over a big run on PostgreSQL: does a chart of one layer still answer fast at 10M layer-rows?

    python bench/series.py                         # 200 layers x 50,000 steps = 10M layer-rows
    python bench/series.py --layers 100 --steps 10000

Creates a database (dropped at the end), migrates it, registers the run and its layers through the real
``Ingestor`` (one batch), then bulk-loads the rest of the run's ``layer_stats`` inside PostgreSQL
(``INSERT .. SELECT`` from ``generate_series``, in slices of steps: no rows cross the client connection, so
the load costs the database's own work only) and ``ANALYZE``. The table is partitioned by day: the run's
steps fall on the last ``--days`` days, among the ``--horizon`` days of partitions a collector keeps. Then it
times ``storage.queries.series``, what ``GET /api/v1/runs/{id}/series`` runs, for layers spread over the model:
the whole run downsampled to ``--max-points``, and a window of the last 1,000 steps. Prints the load rate, the
table's size per row, and the query times (median and worst of ``--repeat`` each); ``--cluster`` times them
again after ``CLUSTER``; ``--retire`` times retention of the run's first day (its rollup inside PostgreSQL and
the partitions' drop).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the batch builder

from sqlalchemy import create_engine, text

from layerwatch import wire
from layerwatch_server.core.batch import Batch
from layerwatch_server.jobs.retention import retire_days
from layerwatch_server.storage import partitions, queries
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.migrations import upgrade
from tests.service.batches import make_batch
from tests.service.dbs import PG_ADMIN_URL


def load(engine, run_id: str, layers: int, steps: int, slice_steps: int, days: int) -> float:
    """Rows for steps 1.. of every layer of the run (step 0 came through the Ingestor), spread evenly over the
    ``days`` days that end today (each in its day's partition); seconds spent."""
    stats = ", ".join(wire.LAYER_STATS)
    # Values that vary per layer and step, a NaN now and then, as a real series would.
    values = ", ".join("CASE WHEN (s + l) % 9973 = 0 THEN 'NaN'::float8 ELSE random() END" for _ in wire.LAYER_STATS)
    sql = text(
        f"INSERT INTO layer_stats (run_id, layer_id, rank, step, day, {stats}) "
        f"SELECT :run, l, 0, s, :first + s * :days / :steps, {values} "
        "FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) s "
        "CROSS JOIN (SELECT id AS l FROM layers WHERE run_id = :run) ls"
    )
    first = int(time.time() // partitions.DAY_S) - days + 1
    t0 = time.perf_counter()
    for lo in range(1, steps, slice_steps):
        with engine.begin() as conn:
            hi = min(steps - 1, lo + slice_steps - 1)
            conn.execute(sql, {"run": run_id, "lo": lo, "hi": hi, "first": first, "days": days, "steps": steps})
    with engine.connect() as conn:
        conn.execute(text("UPDATE runs SET last_step = :s WHERE id = :r"), {"s": steps - 1, "r": run_id})
        conn.commit()
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE layer_stats"))
    return time.perf_counter() - t0


def timed(fn, repeat: int) -> tuple[float, float, int]:
    times, n = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = len(fn())
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--slice-steps", type=int, default=2_500, help="steps per INSERT .. SELECT transaction")
    ap.add_argument("--days", type=int, default=2, help="the run's steps spread over this many days (partitions)")
    ap.add_argument("--horizon", type=int, default=30, help="days of partitions there are (a retention horizon's)")
    ap.add_argument("--max-points", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cluster", action="store_true", help="then CLUSTER the table by its key and time again")
    ap.add_argument("--retire", action="store_true", help="then time retention of the run's first day")
    ap.add_argument("--bucket", type=int, default=100, help="retention's rollup bucket (steps) for --retire")
    args = ap.parse_args()

    name = f"lw_series_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = None
    try:
        upgrade(url)
        engine = make_engine(url)
        # the partitions of a collector that has run for the retention horizon
        partitions.ensure(engine, time.time() - args.horizon * partitions.DAY_S, ahead=args.horizon)
        run_id = Ingestor(engine).write(Batch.model_validate(make_batch("big", steps=[0], n_layers=args.layers))).run_id
        rows = args.layers * args.steps
        seconds = load(engine, run_id, args.layers, args.steps, args.slice_steps, args.days)
        with engine.connect() as conn:
            # the partitions', with their indexes (the partitioned table itself holds no rows)
            size = conn.scalar(text("SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('layer_stats')"))
            n_parts = len(partitions.attached(conn, "layer_stats"))
            names = conn.scalars(text("SELECT name FROM layers WHERE run_id = :r ORDER BY id"), {"r": run_id}).all()
        print(
            f"loaded {rows:,} layer-rows ({args.layers} layers x {args.steps:,} steps) in {seconds:.0f} s "
            f"({rows / seconds:,.0f} rows/s inside PostgreSQL); layer_stats with indexes: {size / 2**30:.2f} GiB, "
            f"{size / rows:.0f} bytes per layer-row; {n_parts} partitions, the run's steps over {args.days} days"
        )

        def query(layer: str, start: int | None) -> list:
            return queries.series(
                engine, run_id, layer=layer, stat="act_std", rank=0, start=start, end=None, max_points=args.max_points
            )

        def report(label: str) -> None:
            for layer in (names[0], names[len(names) // 2], names[-1]):
                whole = timed(lambda layer=layer: query(layer, None), args.repeat)
                window = timed(lambda layer=layer: query(layer, args.steps - 1000), args.repeat)
                print(
                    f"{label} series {layer:14s} whole run ({args.steps:,} points -> {whole[2]}): "
                    f"median {whole[0]:.1f} ms, worst {whole[1]:.1f} ms;  last 1,000 steps: "
                    f"median {window[0]:.1f} ms, worst {window[1]:.1f} ms",
                    flush=True,
                )

        report("as ingested")
        if args.cluster:
            # Ingest writes a step's rows of every layer side by side, so one layer's points lie one per heap
            # page; CLUSTER lays them out in primary-key order, one layer's series on consecutive pages.
            t0 = time.perf_counter()
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                    text("CLUSTER layer_stats USING pk_layer_stats")
                )
            print(f"CLUSTER layer_stats USING pk_layer_stats: {time.perf_counter() - t0:.0f} s", flush=True)
            report("clustered  ")
        if args.retire:
            # Retention of the run's first day: rolled up inside PostgreSQL, then its partitions dropped.
            first = int(time.time() // partitions.DAY_S) - args.days + 1
            part = partitions.name("layer_stats", first)
            with engine.connect() as conn:
                old_rows = conn.scalar(text(f'SELECT count(*) FROM "{part}"'))
            t0 = time.perf_counter()
            _, dropped = retire_days(engine, cutoff=(first + 1) * partitions.DAY_S, bucket=args.bucket)
            spent = time.perf_counter() - t0
            with engine.connect() as conn:
                made = conn.scalar(text("SELECT count(*) FROM rollups"))
            print(
                f"retired {part}: {old_rows:,} layer-rows into {made:,} rollups (buckets of {args.bucket} "
                f"steps), {len(dropped)} partitions dropped, in {spent:.1f} s ({old_rows / spent:,.0f} rows/s)",
                flush=True,
            )
    finally:
        if engine is not None:
            engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
