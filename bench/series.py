"""Series query and health map over a big run on PostgreSQL: do a chart of one layer and the run's health map
still answer fast at 10M layer-rows?

    python bench/series.py                         # 200 layers x 50,000 steps = 10M layer-rows (and param-rows)
    python bench/series.py --layers 100 --steps 10000
    python bench/series.py --sqlite-only           # the health map on SQLite only (--sqlite-steps)

Creates a database (dropped at the end), migrates it, registers the run and its layers through the real
``Ingestor`` (one batch), then bulk-loads the rest of the run's ``layer_stats`` inside PostgreSQL
(``INSERT .. SELECT`` from ``generate_series``, in slices of steps: no rows cross the client connection, so
the load costs the database's own work only) and ``ANALYZE``; ``param_stats`` likewise, one parameter per layer
as the batch builder registers them (``--bias``: a bias beside each, so each module's norm is a sum of two).
The tables are partitioned by day: the run's steps fall on the last ``--days`` days, among the ``--horizon``
days of partitions a collector keeps. Then it times ``storage.queries.series``, what
``GET /api/v1/runs/{id}/series`` runs, for layers spread over the model: the whole run downsampled to
``--max-points``, and a window of the last 1,000 steps. Prints the load rate, the table's size per row, and the
query times (median and worst of ``--repeat`` each); ``--cluster`` times them again after ``CLUSTER``;
``--retire`` times retention of the run's first day (its rollup inside PostgreSQL and the partitions' drop).
``pictures.health_map`` (what the mirror redraws every few minutes per active run, and
``GET /api/v1/runs/{id}/health_map`` serves) is timed beside the Python it replaced (``reference_health_map`` in
tests/service/test_health_map.py: every row of the run read and bucketed in Python, ``--old-repeat`` times),
and the two maps compared; then the same on SQLite for a run of ``--sqlite-steps`` steps (``--sqlite-only``:
that alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the batch builder

from sqlalchemy import create_engine, text

from layerwatch import wire
from layerwatch_server import pictures
from layerwatch_server.core.batch import Batch
from layerwatch_server.jobs.retention import retire_days
from layerwatch_server.storage import partitions, queries
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.migrations import upgrade
from tests.service.batches import make_batch
from tests.service.dbs import PG_ADMIN_URL
from tests.service.test_health_map import assert_same_map, reference_health_map


def load(engine, run_id: str, layers: int, steps: int, slice_steps: int, days: int) -> float:
    """Rows for steps 1.. of every layer and parameter of the run (step 0 came through the Ingestor), spread
    evenly over the ``days`` days that end today (each in its day's partition); seconds spent."""
    first = int(time.time() // partitions.DAY_S) - days + 1
    t0 = time.perf_counter()
    for table, ids, stats in (("layer_stats", "layers", wire.LAYER_STATS), ("param_stats", "params", wire.PARAM_STATS)):
        # Values that vary per series and step, a NaN now and then, as a real series would.
        values = ", ".join("CASE WHEN (s + l) % 9973 = 0 THEN 'NaN'::float8 ELSE random() END" for _ in stats)
        sql = text(
            f"INSERT INTO {table} (run_id, {ids[:-1]}_id, rank, step, day, {', '.join(stats)}) "
            f"SELECT :run, l, 0, s, :first + s * :days / :steps, {values} "
            "FROM generate_series(CAST(:lo AS integer), CAST(:hi AS integer)) s "
            f"CROSS JOIN (SELECT id AS l FROM {ids} WHERE run_id = :run) ls"
        )
        for lo in range(1, steps, slice_steps):
            with engine.begin() as conn:
                hi = min(steps - 1, lo + slice_steps - 1)
                conn.execute(sql, {"run": run_id, "lo": lo, "hi": hi, "first": first, "days": days, "steps": steps})
    with engine.connect() as conn:
        conn.execute(text("UPDATE runs SET last_step = :s WHERE id = :r"), {"s": steps - 1, "r": run_id})
        conn.commit()
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE layer_stats, param_stats"))
    return time.perf_counter() - t0


def load_sqlite(engine, run_id: str, steps: int, slice_steps: int) -> float:
    """As :func:`load`, in SQLite (steps from a recursive CTE, NaN as SQLite keeps it: the text 'NaN')."""
    t0 = time.perf_counter()
    for table, ids, stats in (("layer_stats", "layers", wire.LAYER_STATS), ("param_stats", "params", wire.PARAM_STATS)):
        values = ", ".join(
            "CASE WHEN (s + l) % 9973 = 0 THEN 'NaN' ELSE abs(random()) / 9223372036854775807.0 END" for _ in stats
        )
        sql = text(
            "WITH RECURSIVE steps(s) AS (SELECT :lo UNION ALL SELECT s + 1 FROM steps WHERE s < :hi) "
            f"INSERT INTO {table} (run_id, {ids[:-1]}_id, rank, step, day, {', '.join(stats)}) "
            f"SELECT :run, l, 0, s, 0, {values} FROM steps CROSS JOIN (SELECT id AS l FROM {ids} WHERE run_id = :run)"
        )
        for lo in range(1, steps, slice_steps):
            with engine.begin() as conn:
                conn.execute(sql, {"run": run_id, "lo": lo, "hi": min(steps - 1, lo + slice_steps - 1)})
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    return time.perf_counter() - t0


def add_biases(engine, run_id: str) -> None:
    """``blocks.i.fc.bias`` beside each ``blocks.i.fc.weight``: modules of two parameters, as most layers have."""
    with engine.begin() as conn:
        conn.execute(
            text(
                'INSERT INTO params (run_id, "index", name, shape, numel) SELECT run_id, "index", '
                "replace(name, '.weight', '.bias'), shape, numel FROM params WHERE run_id = :r"
            ),
            {"r": run_id},
        )


def time_health_map(engine, run_id: str, label: str, repeat: int, old_repeat: int) -> None:
    """``pictures.health_map`` (the database buckets) against ``reference_health_map`` (Python buckets), and
    whether they agree."""
    maps = {}

    def draw(name, fn):
        def run():
            maps[name] = fn(engine, run_id)
            return maps[name].steps

        return run

    new = timed(draw("new", pictures.health_map), repeat)
    line = f"{label} health map, {len(maps['new'].steps)} columns: median {new[0]:,.0f} ms, worst {new[1]:,.0f} ms"
    if old_repeat:
        old = timed(draw("old", reference_health_map), old_repeat)
        assert_same_map(maps["new"], maps["old"])
        line += f";  in Python (before): median {old[0]:,.0f} ms, worst {old[1]:,.0f} ms; the same map"
    print(line, flush=True)


def sqlite_health_map(args: argparse.Namespace) -> None:
    per_layer = 2 if args.bias else 1  # parameters
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/series.db"
        upgrade(url)
        engine = make_engine(url)
        try:
            batch = make_batch("big", steps=[0], n_layers=args.layers)
            run_id = Ingestor(engine).write(Batch.model_validate(batch)).run_id
            if args.bias:
                add_biases(engine, run_id)
            seconds = load_sqlite(engine, run_id, args.sqlite_steps, args.slice_steps)
            print(
                f"SQLite: loaded {args.layers * args.sqlite_steps:,} layer-rows and {per_layer} times as many "
                f"param-rows ({args.layers} layers x {args.sqlite_steps:,} steps) in {seconds:.0f} s",
                flush=True,
            )
            time_health_map(engine, run_id, "SQLite     ", args.repeat, args.old_repeat)
        finally:
            engine.dispose()


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
    ap.add_argument("--old-repeat", type=int, default=1, help="times the Python health map runs (0: not at all)")
    ap.add_argument("--sqlite-steps", type=int, default=5_000, help="steps of the SQLite run (0: none)")
    ap.add_argument("--sqlite-only", action="store_true", help="only the health map on SQLite")
    ap.add_argument("--bias", action="store_true", help="a bias parameter beside each layer's weight")
    args = ap.parse_args()
    per_layer = 2 if args.bias else 1  # parameters
    if args.sqlite_only:
        sqlite_health_map(args)
        return

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
        if args.bias:
            add_biases(engine, run_id)
        rows = args.layers * args.steps
        seconds = load(engine, run_id, args.layers, args.steps, args.slice_steps, args.days)
        with engine.connect() as conn:
            # the partitions', with their indexes (the partitioned table itself holds no rows)
            size = conn.scalar(text("SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('layer_stats')"))
            n_parts = len(partitions.attached(conn, "layer_stats"))
            names = conn.scalars(text("SELECT name FROM layers WHERE run_id = :r ORDER BY id"), {"r": run_id}).all()
        print(
            f"loaded {rows:,} layer-rows and {per_layer} times as many param-rows ({args.layers} layers x "
            f"{args.steps:,} steps) in {seconds:.0f} s ({(1 + per_layer) * rows / seconds:,.0f} rows/s inside "
            "PostgreSQL); "
            f"layer_stats with indexes: {size / 2**30:.2f} GiB, "
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
        time_health_map(engine, run_id, "as ingested", args.repeat, args.old_repeat)
        if args.cluster:
            # Ingest writes a step's rows of every layer side by side, so one layer's points lie one per heap
            # page; CLUSTER lays them out in primary-key order, one layer's series on consecutive pages.
            t0 = time.perf_counter()
            with engine.connect() as conn:
                auto = conn.execution_options(isolation_level="AUTOCOMMIT")
                auto.execute(text("CLUSTER layer_stats USING pk_layer_stats"))
                auto.execute(text("CLUSTER param_stats USING pk_param_stats"))
            print(f"CLUSTER layer_stats, param_stats by their keys: {time.perf_counter() - t0:.0f} s", flush=True)
            report("clustered  ")
            time_health_map(engine, run_id, "clustered  ", args.repeat, args.old_repeat)
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
    if args.sqlite_steps:
        sqlite_health_map(args)


if __name__ == "__main__":
    main()
