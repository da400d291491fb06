"""Retention: raw per-step rows older than N days become per-bucket rollups (n, NaN count, min, max,
mean), then the raw rows are deleted. One transaction per (run, rank), so a crash leaves either the raw
rows or their rollups, never both halves missing.

Only whole buckets are rolled up (all steps below ``boundary``, a multiple of the bucket size). Min,
max and mean ignore NaN (``nan_count`` keeps it visible); +/-Inf are kept as values. User scalars are
not rolled up.

Histograms are deleted, not rolled up: a per-layer histogram is taken every ``histogram_every`` steps (100 by
default), already as coarse as a rollup bucket, and the pictures they feed are of recent training. They go in
the transaction of each rank's rollup, up to its boundary (every step below it is older than the cutoff: they
are run-wide, sent by rank 0). Bin edges no histogram uses any more are deleted after
(:func:`delete_orphan_edges`).

On PostgreSQL ``layer_stats`` and ``param_stats`` are partitioned by day (:mod:`layerwatch_server.storage.partitions`)
and :func:`retire_days` is the job instead: each day older than the horizon is rolled up inside PostgreSQL and its
partitions dropped, not its rows deleted. A bucket of steps that spans two days is rolled up with the first and
merged with the second (counts added, extremes kept, means weighted), so every raw row is counted once. The
steps (``step_stats``, a plain table: its key is what makes a re-sent step a duplicate) and histograms of those
days go in the same transaction, by the same day boundary, row by row.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, text
from sqlalchemy.exc import OperationalError

from layerwatch import wire
from layerwatch_server.storage import partitions
from layerwatch_server.storage.base import db_float, dialect_insert
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import (
    Layer,
    Param,
    Rollup,
    histogram_edges,
    histograms,
    layer_stats,
    param_stats,
    step_stats,
)
from layerwatch_server.storage.ticks import JobFn

log = logging.getLogger("layerwatch_server.jobs")


def retention_job(retention_days: float, bucket_steps: int) -> JobFn:
    def job(engine: Engine, now: float) -> None:
        cutoff = now - retention_days * 86400
        if engine.dialect.name == "postgresql":
            try:
                partitions.ensure(engine, now)
            except OperationalError as exc:  # its lock not had in time: the default partition takes the rows meanwhile
                log.warning("partitions ahead not created this tick: %s", str(exc.orig).strip())
            rolled, dropped = retire_days(engine, cutoff=cutoff, bucket=bucket_steps)
            if rolled or dropped:
                log.info(
                    "retention rolled up %d raw steps and dropped %d partitions older than %.1f days",
                    rolled,
                    len(dropped),
                    retention_days,
                )
            return
        rolled = roll_up(engine, cutoff=cutoff, bucket=bucket_steps)
        if rolled:
            log.info("retention rolled up %d raw steps older than %.1f days", rolled, retention_days)

    return job


def roll_up(engine: Engine, *, cutoff: float, bucket: int) -> int:
    """Roll up every whole bucket of steps whose time is before ``cutoff``; returns raw steps removed."""
    with engine.connect() as conn:
        old = conn.execute(
            select(step_stats.c.run_id, step_stats.c.rank, func.max(step_stats.c.step))
            .where(step_stats.c.time < cutoff)
            .group_by(step_stats.c.run_id, step_stats.c.rank)
        ).all()
    total = 0
    for run_id, rank, last_old in old:
        boundary = (last_old + 1) // bucket * bucket
        if boundary == 0:
            continue
        with writer(engine).begin() as conn:
            total += _roll_rank(conn, run_id, rank, boundary, bucket)
            conn.execute(delete(histograms).where(histograms.c.run_id == run_id, histograms.c.step < boundary))
    if total:
        delete_orphan_edges(engine)
    return total


def delete_orphan_edges(engine: Engine) -> int:
    """Delete the bin edges no histogram refers to; returns how many.

    Ingest registers a batch's edges (insert, or nothing when they are known) before its histograms, in one
    transaction. On PostgreSQL that insert does not lock a known row, so the edges are re-checked under a table
    lock that waits for ingest transactions in flight (and holds new ones back for the moment the re-check
    takes): their histograms are then visible, and edges they use are kept. SQLite has one writer at a time.
    The first look, without the lock, finds the candidates: usually none (every run uses the same bins).
    """

    def unused(conn: Connection, ids: list[str]) -> list[str]:
        used = select(histograms.c.edges_id).where(histograms.c.edges_id == histogram_edges.c.id).exists()
        return list(conn.scalars(select(histogram_edges.c.id).where(histogram_edges.c.id.in_(ids), ~used)))

    with engine.connect() as conn:
        candidates = unused(conn, list(conn.scalars(select(histogram_edges.c.id))))
    if not candidates:
        return 0
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("LOCK TABLE histogram_edges IN SHARE ROW EXCLUSIVE MODE")
        orphans = unused(conn, candidates)
        if orphans:
            conn.execute(delete(histogram_edges).where(histogram_edges.c.id.in_(orphans)))
    return len(orphans)


def _roll_rank(conn: Connection, run_id: str, rank: int, boundary: int, bucket: int) -> int:
    rollups: list[dict[str, Any]] = []
    for kind, table, id_col, model, stats in (
        ("layer", layer_stats, "layer_id", Layer, wire.LAYER_STATS),
        ("param", param_stats, "param_id", Param, wire.PARAM_STATS),
    ):
        for series_id in conn.scalars(select(model.id).where(model.run_id == run_id)):
            rows = conn.execute(
                select(table.c.step, *(table.c[s] for s in stats)).where(
                    table.c.run_id == run_id,
                    table.c[id_col] == series_id,
                    table.c.rank == rank,
                    table.c.step < boundary,
                )
            ).all()
            rollups += _buckets(run_id, rank, kind, series_id, stats, rows, bucket)
        conn.execute(delete(table).where(table.c.run_id == run_id, table.c.rank == rank, table.c.step < boundary))
    where = (step_stats.c.run_id == run_id, step_stats.c.rank == rank, step_stats.c.step < boundary)
    rows = conn.execute(select(step_stats.c.step, *(step_stats.c[s] for s in wire.STEP_STATS)).where(*where)).all()
    rollups += _buckets(run_id, rank, "step", 0, wire.STEP_STATS, rows, bucket)
    removed = conn.execute(delete(step_stats).where(*where)).rowcount
    for i in range(0, len(rollups), 500):
        # A step re-sent after its bucket was rolled up lands raw again; its rollup is not redone.
        conn.execute(dialect_insert(conn, Rollup).values(rollups[i : i + 500]).on_conflict_do_nothing())
    return removed


def _buckets(
    run_id: str, rank: int, kind: str, series_id: int, stats: Iterable[str], rows: list[Any], bucket: int
) -> list[dict[str, Any]]:
    grouped: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        grouped[row[0] // bucket * bucket].append(row)
    out = []
    for start, members in grouped.items():
        for i, stat in enumerate(stats, start=1):
            values = [db_float(r[i]) for r in members if r[i] is not None]
            if not values:
                continue
            real = [v for v in values if not math.isnan(v)]
            mean = sum(real) / len(real) if real else math.nan
            out.append(
                {
                    "run_id": run_id,
                    "series": kind,
                    "series_id": series_id,
                    "stat": stat,
                    "rank": rank,
                    "bucket_start": start,
                    "bucket_end": start + bucket - 1,
                    "n": len(values),
                    "nan_count": len(values) - len(real),
                    "min": min(real, default=math.nan),
                    "max": max(real, default=math.nan),
                    "mean": mean,
                }
            )
    return out


# -- PostgreSQL: whole days ------------------------------------------------------------------------------

_RETIRE_LOCK = 7264  # advisory lock: one replica retires days at a time (the others skip their tick)


def retire_days(engine: Engine, *, cutoff: float, bucket: int) -> tuple[int, list[str]]:
    """Roll up and drop every day before the day of ``cutoff`` (PostgreSQL); (raw steps removed, partitions
    dropped). One transaction per day that has partitions, oldest first, then one for what is left of the older
    days (rows of the default partition, steps of days with no partition). A replica that finds another at it,
    or whose DROP waits past :data:`partitions.LOCK_TIMEOUT`, stops: the next tick goes on from there."""
    upto = int(cutoff // partitions.DAY_S)
    with engine.connect() as conn:
        ends = sorted({p.hi for t in partitions.PARTITIONED for p in partitions.attached(conn, t) if p.hi is not None})
    steps, dropped = 0, []
    for end in [e for e in ends if e < upto] + [upto]:
        try:
            done = _retire(engine, end, bucket)
        except OperationalError as exc:  # lock_timeout: ingest or a long query held the table
            log.warning("retention stopped before day %d: %s", end, str(exc.orig).strip())
            break
        if done is None:
            log.info("retention skipped: another replica is retiring days")
            break
        steps += done[0]
        dropped += done[1]
    if steps:
        delete_orphan_edges(engine)
    return steps, dropped


def _retire(engine: Engine, upto: int, bucket: int) -> tuple[int, list[str]] | None:
    """Everything before day ``upto``: partitions that end by then dropped, older rows of the default partitions
    and older steps rolled up and deleted, in one transaction; None when another replica holds the lock."""
    before = upto * partitions.DAY_S
    with writer(engine).begin() as conn:
        if not conn.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _RETIRE_LOCK}):
            return None
        old: list[str] = []
        for table, (kind, id_col, stats) in _SERIES.items():
            for part in partitions.attached(conn, table):  # the default partition last
                if part.hi is None:
                    conn.execute(
                        text(_rollup_sql(part.name, kind, id_col, stats, "day < :upto")), {"b": bucket, "upto": upto}
                    )
                    conn.execute(text(f'DELETE FROM "{part.name}" WHERE day < :upto'), {"upto": upto})
                elif part.hi <= upto:
                    conn.execute(text(_rollup_sql(part.name, kind, id_col, stats, "true")), {"b": bucket})
                    old.append(part.name)
        conn.execute(
            text(_rollup_sql("step_stats", "step", None, wire.STEP_STATS, "time < :t")), {"b": bucket, "t": before}
        )
        conn.execute(
            text(
                "DELETE FROM histograms h USING (SELECT run_id, max(step) AS last FROM step_stats WHERE time < :t "
                "GROUP BY run_id) o WHERE h.run_id = o.run_id AND h.step <= o.last"
            ),
            {"t": before},
        )
        removed = conn.execute(text("DELETE FROM step_stats WHERE time < :t"), {"t": before}).rowcount
        if old:
            # Last, so the parents' ACCESS EXCLUSIVE lock (ingest waits on it) is held only up to the commit.
            conn.execute(text(f"SET LOCAL lock_timeout = '{partitions.LOCK_TIMEOUT}'"))
            conn.execute(text(f"LOCK TABLE {', '.join(partitions.PARTITIONED)} IN ACCESS EXCLUSIVE MODE"))
            for part in old:
                conn.execute(text(f'DROP TABLE "{part}"'))
    return removed, old


_SERIES = {
    "layer_stats": ("layer", "layer_id", wire.LAYER_STATS),
    "param_stats": ("param", "param_id", wire.PARAM_STATS),
}


def _rollup_sql(source: str, kind: str, id_col: str | None, stats: Iterable[str], where: str) -> str:
    """INSERT .. SELECT of the rollups of ``source``'s rows where ``where`` (bucket size ``:b``), merged into those
    already there. The same figures as :func:`_buckets`: n counts values, NaN counted apart and left out of
    min, max and mean (NaN when nothing else is left), +/-Inf kept. One pass groups the rows by series and
    bucket with every statistic's aggregates side by side; only the groups are then turned into a row per
    statistic (unpivoting each raw row first made the aggregation seven times the work)."""
    stats = list(stats)
    series = f"t.{id_col}" if id_col else "0"
    aggs = ", ".join(
        f"count(t.{s}) AS n{i}, count(*) FILTER (WHERE t.{s} = 'NaN') AS z{i}, "
        f"min(t.{s}) FILTER (WHERE t.{s} <> 'NaN') AS lo{i}, max(t.{s}) FILTER (WHERE t.{s} <> 'NaN') AS hi{i}, "
        f"avg(t.{s}) FILTER (WHERE t.{s} <> 'NaN') AS m{i}"
        for i, s in enumerate(stats)
    )
    unpivot = ", ".join(f"('{s}', g.n{i}, g.z{i}, g.lo{i}, g.hi{i}, g.m{i})" for i, s in enumerate(stats))
    r_real, e_real = "(r.n - r.nan_count)", "(excluded.n - excluded.nan_count)"
    return (
        f"WITH g AS (SELECT t.run_id, {series} AS series_id, t.rank, t.step - t.step % :b AS b, {aggs} "
        f'FROM "{source}" t WHERE {where} GROUP BY 1, 2, 3, 4) '
        "INSERT INTO rollups AS r (run_id, series, series_id, stat, rank, bucket_start, bucket_end, n, nan_count, "
        f"min, max, mean) SELECT g.run_id, '{kind}', g.series_id, v.stat, g.rank, g.b, g.b + :b - 1, v.n, v.z, "
        "coalesce(v.lo, 'NaN'), coalesce(v.hi, 'NaN'), coalesce(v.m, 'NaN') "
        f"FROM g CROSS JOIN LATERAL (VALUES {unpivot}) AS v(stat, n, z, lo, hi, m) WHERE v.n > 0 "
        "ON CONFLICT (run_id, series, series_id, stat, rank, bucket_start) DO UPDATE SET "
        "n = r.n + excluded.n, nan_count = r.nan_count + excluded.nan_count, "
        "min = LEAST(r.min, excluded.min), "  # NaN (nothing real) sorts above every value in PostgreSQL
        "max = CASE WHEN r.max = 'NaN' THEN excluded.max WHEN excluded.max = 'NaN' THEN r.max "
        "ELSE GREATEST(r.max, excluded.max) END, "
        f"mean = CASE WHEN {e_real} = 0 THEN r.mean WHEN {r_real} = 0 THEN excluded.mean "
        f"ELSE (r.mean * {r_real} + excluded.mean * {e_real}) / ({r_real} + {e_real}) END"
    )
