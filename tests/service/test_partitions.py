"""PostgreSQL's day partitions of layer_stats and param_stats: the migration that makes them from a populated
database, the day each row lands in, retention that rolls up and drops whole days (and two replicas at it at
once), and the series query still served by each partition's index. Each test has a database of its own."""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from layerwatch import wire
from layerwatch_server.core.batch import Batch
from layerwatch_server.jobs.retention import _buckets, retention_job, retire_days
from layerwatch_server.storage import partitions, queries
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.migrations import alembic_config, upgrade

from .batches import make_batch, unique
from .dbs import fresh_pg_database
from .test_histograms import entry, with_histograms

pytestmark = pytest.mark.postgres

DAY = partitions.DAY_S


@pytest.fixture
def pg_url():
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def engine(pg_url):
    upgrade(pg_url)
    eng = make_engine(pg_url)
    yield eng
    eng.dispose()


def write(engine, body: dict, times: dict[int, float]) -> str:
    """Ingest ``body`` with each step's time from ``times``; the run's id."""
    for s in body["steps"]:
        s["time"] = times[s["step"]]
    return Ingestor(engine).write(Batch.model_validate(body)).run_id


def homes(conn, table: str, run_id: str) -> dict[int, str]:
    """step -> the partition its rows are in."""
    rows = conn.execute(
        text(f"SELECT DISTINCT step, tableoid::regclass::text FROM {table} WHERE run_id = :r"), {"r": run_id}
    ).all()
    out: dict[int, str] = {}
    for step, part in rows:
        assert out.setdefault(step, part) == part, f"step {step} in two partitions"
    return out


def children(conn, table: str) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            text("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = CAST(:t AS regclass)"),
            {"t": table},
        )
    }


def test_migration_partitions_a_populated_database_and_downgrades(pg_url):
    upgrade(pg_url, "0005")
    now = time.time()
    today, old = int(now // DAY), int((now - 10 * DAY) // DAY)
    eng = create_engine(pg_url)
    with eng.begin() as conn:
        for step, t in ((0, now - 10 * DAY), (1, now - 10 * DAY), (2, now), (3, now + 5 * DAY)):
            conn.execute(
                text("INSERT INTO step_stats (run_id, rank, step, time, loss) VALUES ('r1', 0, :s, :t, 1.0)"),
                {"s": step, "t": t},
            )
        for step in (0, 1, 2, 3, 9):  # step 9 has no step row: filed under today
            for layer in (1, 2):
                conn.execute(
                    text(
                        "INSERT INTO layer_stats (run_id, layer_id, rank, step, act_mean, act_max_abs) "
                        "VALUES ('r1', :l, 0, :s, :v, 'Infinity')"
                    ),
                    {"l": layer, "s": step, "v": step + layer / 10},
                )
            conn.execute(
                text("INSERT INTO param_stats (run_id, param_id, rank, step, grad_norm) VALUES ('r1', 1, 0, :s, :v)"),
                {"s": step, "v": float(step)},
            )
    with eng.connect() as conn:
        before = {table: sorted(conn.execute(text(f"SELECT * FROM {table}")).all()) for table in partitions.PARTITIONED}

    upgrade(pg_url)
    with eng.connect() as conn:
        for table in partitions.PARTITIONED:
            assert conn.scalar(text(f"SELECT relkind FROM pg_class WHERE relname = '{table}'")) == "p"
            days = set(range(today, today + partitions.AHEAD_DAYS + 1)) | {old}
            assert children(conn, table) == {partitions.name(table, d) for d in days} | {f"{table}_default"}
            cols = ", ".join(c for c in before[table][0]._fields)
            assert sorted(conn.execute(text(f"SELECT {cols} FROM {table}")).all()) == before[table]
            where = homes(conn, table, "r1")
            assert where == {0: partitions.name(table, old), 1: partitions.name(table, old)} | {
                s: partitions.name(table, today)
                for s in (2, 3, 9)  # a step time ahead of today: today
            }

    upgrade(pg_url)  # at head: nothing to do
    command.downgrade(alembic_config(pg_url), "0005")
    with eng.connect() as conn:
        for table, series in (("layer_stats", "layer_id"), ("param_stats", "param_id")):
            assert conn.scalar(text(f"SELECT relkind FROM pg_class WHERE relname = '{table}'")) == "r"
            assert not conn.scalar(text(f"SELECT count(*) FROM pg_class WHERE relname LIKE '{table}\\_2%'"))
            assert sorted(conn.execute(text(f"SELECT * FROM {table}")).all()) == before[table]
            pk = conn.scalars(
                text(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = CAST(:t AS regclass) AND i.indisprimary"
                ),
                {"t": table},
            ).all()
            assert sorted(pk) == sorted(["run_id", series, "rank", "step"])
    upgrade(pg_url)  # and up again
    eng.dispose()


def test_ingest_files_each_step_under_its_days_partition(engine):
    now = time.time()
    today = int(now // DAY)
    times = {0: now - 3 * DAY, 1: -5e8, 2: now, 3: now + 30 * DAY}  # no partition, 1954, today, a clock ahead
    run_id = write(engine, make_batch(unique("k"), steps=range(4), n_layers=2, project=unique()), times)
    with engine.connect() as conn:
        for table in partitions.PARTITIONED:
            assert homes(conn, table, run_id) == {
                0: f"{table}_default",
                1: f"{table}_default",
                2: partitions.name(table, today),
                3: partitions.name(table, today),
            }
        days = dict(conn.execute(text("SELECT step, day FROM layer_stats WHERE run_id = :r"), {"r": run_id}).all())
    assert days == {0: today - 3, 1: 0, 2: today, 3: today}
    pts = queries.series(
        engine, run_id, layer="blocks.1.fc", stat="act_mean", rank=0, start=None, end=None, max_points=None
    )
    assert [p["step"] for p in pts] == [0, 1, 2, 3]


def _raw_rows(conn, run_id: str, table: str, id_col: str, stats: tuple[str, ...]):
    cols = ", ".join(stats)
    return conn.execute(
        text(f"SELECT {id_col}, rank, step, {cols} FROM {table} WHERE run_id = :r ORDER BY step"), {"r": run_id}
    ).all()


def expected_rollups(conn, run_id: str, bucket: int, last_step: int) -> dict[tuple, tuple]:
    """What retention's Python rollup (the SQLite path's, :func:`_buckets`) makes of the run's steps up to
    ``last_step``: (series, id, stat, bucket_start) -> (n, nan_count, min, max, mean)."""
    out = {}
    for kind, table, id_col, stats in (
        ("layer", "layer_stats", "layer_id", wire.LAYER_STATS),
        ("param", "param_stats", "param_id", wire.PARAM_STATS),
    ):
        by_series = defaultdict(list)
        for sid, _rank, step, *values in _raw_rows(conn, run_id, table, id_col, stats):
            if step <= last_step:
                by_series[sid].append((step, *values))
        for sid, rows in by_series.items():
            for r in _buckets(run_id, 0, kind, sid, stats, rows, bucket):
                out[(kind, sid, r["stat"], r["bucket_start"])] = (r["n"], r["nan_count"], r["min"], r["max"], r["mean"])
    return out


def stored_rollups(conn, run_id: str) -> dict[tuple, tuple]:
    rows = conn.execute(
        text(
            "SELECT series, series_id, stat, bucket_start, n, nan_count, min, max, mean FROM rollups "
            "WHERE run_id = :r AND series <> 'step'"
        ),
        {"r": run_id},
    ).all()
    return {tuple(r[:4]): tuple(r[4:]) for r in rows}


def same(a: dict[tuple, tuple], b: dict[tuple, tuple]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12), (key, a[key], b[key])


def test_retention_rolls_up_and_drops_the_days_past_its_horizon(engine):
    now = time.time()
    today = int(now // DAY)
    partitions.ensure(engine, now - 41 * DAY, ahead=2)  # days 41, 40 and 39 ago, as if the collector ran then
    d40, d39 = today - 40, today - 39
    times = {s: d40 * DAY + 3600 + s for s in range(120)}  # bucket 100..199 spans two old days and today
    times |= {s: d39 * DAY + 3600 + s for s in range(120, 150)}
    times |= {s: now for s in range(150, 180)}
    overrides = {(5, 0, "act_mean"): math.nan, (110, 0, "act_max_abs"): 1e6, (111, 1, "act_std"): math.inf}
    body = make_batch(unique("k"), steps=range(180), n_layers=2, project=unique(), overrides=overrides)
    body = with_histograms(body, [entry("blocks.0.fc", s, [1, 2, 3, 4]) for s in (0, 50, 100, 150)])
    run_a = write(engine, body, times)
    run_b = write(
        engine,
        make_batch(unique("k"), steps=range(3), n_layers=2, project=unique()),
        dict.fromkeys(range(3), now - 35 * DAY),
    )
    with engine.connect() as conn:
        assert set(homes(conn, "layer_stats", run_b).values()) == {"layer_stats_default"}
        want_a = expected_rollups(conn, run_a, 100, last_step=149)
        want_b = expected_rollups(conn, run_b, 100, last_step=2)
        gone = {partitions.name(t, d) for t in partitions.PARTITIONED for d in (today - 41, d40, d39)}
        assert gone <= children(conn, "layer_stats") | children(conn, "param_stats")

    retention_job(30, 100)(engine, now)

    with engine.connect() as conn:
        left = children(conn, "layer_stats") | children(conn, "param_stats")
        assert not gone & left
        assert not any(conn.scalar(text("SELECT to_regclass(:p)"), {"p": p}) for p in gone)  # dropped, not detached
        assert {partitions.name(t, d) for t in partitions.PARTITIONED for d in (today, today + 7)} <= left
        for table in partitions.PARTITIONED:
            assert set(homes(conn, table, run_a)) == set(range(150, 180))  # today's stay raw
            assert not homes(conn, table, run_b)
        steps = conn.scalars(text("SELECT step FROM step_stats WHERE run_id = :r ORDER BY step"), {"r": run_a}).all()
        assert steps == list(range(150, 180))
        hist = conn.scalars(text("SELECT step FROM histograms WHERE run_id = :r"), {"r": run_a}).all()
        assert hist == [150]
        same(stored_rollups(conn, run_a), want_a)  # bucket 100 rolled from two days, merged: counted once
        same(stored_rollups(conn, run_b), want_b)
        loss = conn.execute(
            text(
                "SELECT n, min, max FROM rollups WHERE run_id = :r AND series = 'step' AND stat = 'loss' "
                "AND bucket_start = 100"
            ),
            {"r": run_a},
        ).one()
        assert loss == (50, 1 / 150, 1 / 101)

    pts = queries.series(
        engine, run_a, layer="blocks.0.fc", stat="act_max_abs", rank=0, start=None, end=None, max_points=None
    )
    assert [p["step"] for p in pts] == [0, 100, *range(150, 180)]
    assert pts[1]["max"] == 1e6
    assert retire_days(engine, cutoff=now - 30 * DAY, bucket=100) == (0, [])  # nothing left to retire


def test_two_replicas_retiring_at_once_count_each_row_once(engine):
    now = time.time()
    today = int(now // DAY)
    partitions.ensure(engine, now - 50 * DAY, ahead=5)
    runs = []
    for k in range(3):
        times = {s: (today - 50 + k) * DAY + s for s in range(60)}
        runs.append(write(engine, make_batch(unique("k"), steps=range(60), n_layers=3, project=unique()), times))
    with engine.connect() as conn:
        want = {r: expected_rollups(conn, r, 25, last_step=59) for r in runs}
    barrier = threading.Barrier(2)
    results, errors = [], []

    def replica() -> None:
        barrier.wait()
        try:
            results.append(retire_days(engine, cutoff=now - 30 * DAY, bucket=25))
        except Exception as exc:  # pragma: no cover - what the test is for
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    retire_days(engine, cutoff=now - 30 * DAY, bucket=25)  # whatever a skipped replica left
    assert sum(steps for steps, _ in results) <= 180
    with engine.connect() as conn:
        for r in runs:
            same(stored_rollups(conn, r), want[r])
            assert not homes(conn, "layer_stats", r)
        assert not conn.scalar(text("SELECT count(*) FROM step_stats"))


def test_series_query_reads_each_partitions_index(engine):
    now = time.time()
    today = int(now // DAY)
    partitions.ensure(engine, now - 3 * DAY, ahead=3)
    run_id = write(engine, make_batch(unique("k"), steps=[0], n_layers=20, project=unique()), {0: now})
    stats = ", ".join(wire.LAYER_STATS)
    with engine.begin() as conn:
        # 20 runs' worth of rows over three days, so that one layer of one run is a small part of each partition
        for d in range(3):
            conn.execute(
                text(
                    f"INSERT INTO layer_stats (run_id, layer_id, rank, step, day, {stats}) "
                    f"SELECT CASE WHEN r = 0 THEN :run ELSE 'other' || r END, l, 0, s + :d * 1000, :day, "
                    f"{', '.join('random()' for _ in wire.LAYER_STATS)} "
                    "FROM generate_series(0, 19) r, generate_series(1, 20) l, generate_series(1, 250) s"
                ),
                {"run": run_id, "d": d, "day": today - 2 + d},
            )
        conn.execute(text("ANALYZE layer_stats"))
        layer = conn.scalar(text("SELECT min(layer_id) FROM layer_stats WHERE run_id = :r"), {"r": run_id})
        for part in children(conn, "layer_stats"):
            assert conn.scalar(
                text("SELECT count(*) FROM pg_index WHERE indrelid = CAST(:p AS regclass) AND indisprimary"),
                {"p": part},
            ), f"{part} has no primary key index"
        full = {p for p in children(conn, "layer_stats") if conn.scalar(text(f'SELECT count(*) FROM "{p}"'))}
        plan = conn.scalar(
            text(
                "EXPLAIN (FORMAT JSON) SELECT step, act_mean FROM layer_stats WHERE run_id = :r AND layer_id = :l "
                "AND rank = 0 AND step >= 0 ORDER BY step LIMIT 200000"
            ),
            {"r": run_id, "l": layer},
        )
    scans = {node["Relation Name"]: node["Node Type"] for node in _nodes(plan[0]["Plan"]) if "Relation Name" in node}
    assert len(full) == 3 and full <= scans.keys(), scans
    indexed = ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")  # the last over a Bitmap Index Scan
    assert all(scans[p] in indexed for p in full), scans  # empty partitions may be scanned whole: nothing in them
    pts = queries.series(
        engine, run_id, layer="blocks.0.fc", stat="act_mean", rank=0, start=None, end=None, max_points=100
    )
    assert 0 < len(pts) <= 100


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)
