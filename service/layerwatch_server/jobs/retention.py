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
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from layerwatch import wire
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
        rolled = roll_up(engine, cutoff=now - retention_days * 86400, bucket=bucket_steps)
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
