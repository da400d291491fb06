"""Read side: projects, runs, one run in detail, and one statistic over steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Double, Engine, Select, cast, func, select
from sqlalchemy.dialects.postgresql import array

from layerwatch import wire
from layerwatch_server.storage.base import db_float
from layerwatch_server.storage.models import (
    OPEN_ALERT_STATES,
    AlertRow,
    Layer,
    Param,
    Project,
    Rollup,
    Run,
    RunRank,
    layer_stats,
    param_stats,
    step_stats,
)

MAX_POINTS = 200_000  # a series answer never holds more raw points than this


class NotFound(LookupError):
    """A run, layer or parameter that does not exist; the message says which."""


class BadQuery(ValueError):
    """A query that cannot be answered as asked; the message says why (422)."""


def list_projects(engine: Engine, only: set[str] | None) -> list[dict[str, Any]]:
    stmt = (
        select(Project.name, Project.created_at, func.count(Run.id).label("runs"))
        .outerjoin(Run, Run.project_id == Project.id)
        .group_by(Project.id, Project.name, Project.created_at)
        .order_by(Project.name)
    )
    if only is not None:
        stmt = stmt.where(Project.name.in_(only))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


_RUN_COLUMNS = (
    Run.id,
    Run.name,
    Project.name.label("project"),
    Run.key,
    Run.status,
    Run.world_size,
    Run.created_at,
    Run.last_seen,
    Run.first_step,
    Run.last_step,
)


def list_runs(
    engine: Engine, *, project: str | None, status: str | None, only: set[str] | None, limit: int
) -> list[dict[str, Any]]:
    stmt = select(*_RUN_COLUMNS).join(Project, Project.id == Run.project_id)
    if project is not None:
        stmt = stmt.where(Project.name == project)
    if status is not None:
        stmt = stmt.where(Run.status == status)
    if only is not None:
        stmt = stmt.where(Project.name.in_(only))
    stmt = stmt.order_by(Run.last_seen.desc()).limit(limit)
    with engine.connect() as conn:
        runs = [dict(r._mapping) for r in conn.execute(stmt)]
        _with_open_alerts(conn, runs)
    return runs


def _with_open_alerts(conn: Connection, runs: list[dict[str, Any]]) -> None:
    """Add each run's count of firing and pending alerts: what a person scanning a list of runs looks for."""
    counts: dict[tuple[str, str], int] = {}
    ids = [r["id"] for r in runs]
    for i in range(0, len(ids), 500):  # bounded IN lists
        q = (
            select(AlertRow.run_id, AlertRow.state, func.count())
            .where(AlertRow.run_id.in_(ids[i : i + 500]), AlertRow.state.in_(OPEN_ALERT_STATES))
            .group_by(AlertRow.run_id, AlertRow.state)
        )
        counts.update({(run_id, state): n for run_id, state, n in conn.execute(q)})
    for r in runs:
        r["firing_alerts"] = counts.get((r["id"], "firing"), 0)
        r["pending_alerts"] = counts.get((r["id"], "pending"), 0)


MIN_ID_PREFIX = 4  # as git: shorter prefixes match too much to mean one run


def resolve_run_id(engine: Engine, ref: str, projects: set[str] | None = None) -> str:
    """The id of the run that ``ref`` names: its whole id, or a prefix of it (at least 4 characters) that only
    it has, as git takes a commit's. NotFound when none matches; BadQuery when several do (their ids are not
    listed). Only runs of ``projects`` count (None: every project): a run elsewhere is not found exactly as a
    run that does not exist is, and does not make a prefix ambiguous."""
    runs = select(Run.id)
    if projects is not None:
        runs = runs.join(Project, Project.id == Run.project_id).where(Project.name.in_(projects))
    with engine.connect() as conn:
        if conn.scalar(runs.where(Run.id == ref)) is not None:
            return ref
        if len(ref) < MIN_ID_PREFIX or not (ref.isascii() and ref.isalnum()):  # also no LIKE wildcard in it
            raise NotFound(f"run {ref!r} not found")
        ids = conn.scalars(runs.where(Run.id.like(ref + "%")).limit(2)).all()
    if not ids:
        raise NotFound(f"run {ref!r} not found (no run id starts with it)")
    if len(ids) > 1:
        raise BadQuery(f"run id prefix {ref!r} is ambiguous: more than one run id starts with it; give more of the id")
    return ids[0]


def run_project(engine: Engine, run_id: str) -> str:
    with engine.connect() as conn:
        name = conn.scalar(select(Project.name).join(Run, Run.project_id == Project.id).where(Run.id == run_id))
    if name is None:
        raise NotFound(f"run {run_id!r} not found")
    return name


def get_run(engine: Engine, run_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            select(*_RUN_COLUMNS, Run.config, Run.mlflow_run_id, Run.nonfinite_origin)
            .join(Project, Project.id == Run.project_id)
            .where(Run.id == run_id)
        ).first()
        if row is None:
            raise NotFound(f"run {run_id!r} not found")
        out = dict(row._mapping)
        _with_open_alerts(conn, [out])
        out["ranks"] = [
            dict(r._mapping)
            for r in conn.execute(
                select(
                    RunRank.rank,
                    RunRank.host,
                    RunRank.pid,
                    RunRank.last_seen,
                    RunRank.dropped_reports,
                    RunRank.dropped_batches,
                )
                .where(RunRank.run_id == run_id)
                .order_by(RunRank.rank)
            )
        ]
        out["layers"] = [
            dict(r._mapping)
            for r in conn.execute(
                select(Layer.name, Layer.type, Layer.kind, Layer.shape, Layer.units)
                .where(Layer.run_id == run_id)
                .order_by(Layer.index, Layer.id)
            )
        ]
        out["params"] = [
            dict(r._mapping)
            for r in conn.execute(
                select(Param.name, Param.shape, Param.numel)
                .where(Param.run_id == run_id)
                .order_by(Param.index, Param.id)
            )
        ]
    return out


def series(
    engine: Engine,
    run_id: str,
    *,
    layer: str | None,
    stat: str,
    rank: int,
    start: int | None,
    end: int | None,
    max_points: int | None,
) -> list[dict[str, Any]]:
    """Points ``{"step", "value"}`` in step order, steps where the statistic was not measured left out;
    rolled-up buckets add ``min``/``max``."""
    with engine.connect() as conn:
        if conn.scalar(select(Run.id).where(Run.id == run_id)) is None:
            raise NotFound(f"run {run_id!r} not found")
        scalar_name: str | None = None
        if layer is None:
            if stat in wire.LAYER_STATS or stat in wire.PARAM_STATS:
                raise BadQuery(f"stat {stat!r} is per layer/parameter: give layer=<name>")
            kind, series_id = "step", 0
            table = step_stats
            if stat in wire.STEP_STATS:
                value_col = step_stats.c[stat]
            else:  # a user scalar, kept in the scalars JSON of each step
                scalar_name, value_col = stat, step_stats.c.scalars
            where = [table.c.run_id == run_id]
        else:
            if stat in wire.LAYER_STATS:
                kind, model, table = "layer", Layer, layer_stats
            elif stat in wire.PARAM_STATS:
                kind, model, table = "param", Param, param_stats
            else:
                known = list(wire.LAYER_STATS + wire.PARAM_STATS)
                raise BadQuery(f"stat {stat!r} is not a layer or parameter statistic; known: {known}")
            series_id = conn.scalar(select(model.id).where(model.run_id == run_id, model.name == layer))
            if series_id is None:
                raise NotFound(f"{kind} {layer!r} not found in run {run_id!r}")
            value_col = table.c[stat]
            where = [table.c.run_id == run_id, table.c[f"{kind}_id"] == series_id]
        where.append(table.c.rank == rank)
        if start is not None:
            where.append(table.c.step >= start)
        if end is not None:
            where.append(table.c.step <= end)
        raw = select(table.c.step, value_col).where(*where)
        if max_points is not None and scalar_name is None and conn.dialect.name == "postgresql":
            rows = _downsampled_in_postgresql(conn, raw.where(value_col.is_not(None)), max_points)
            max_points = None  # done
        else:
            rows = conn.execute(raw.order_by(table.c.step).limit(MAX_POINTS)).all()
        rollups = _rollups(conn, run_id, kind, series_id, stat, rank, start, end)
    if scalar_name is not None:
        points = [{"step": s, "value": _scalar(v, scalar_name)} for s, v in rows]
    else:
        points = [{"step": s, "value": db_float(v)} for s, v in rows]
    # A null is "not measured at this step" (dead_frac between window ends, full parameter statistics
    # between their steps): a series holds the measurements only.
    points = [p for p in points if p["value"] is not None]
    if max_points is not None:
        points = downsample(points, max_points)
    return sorted(rollups + points, key=lambda p: p["step"])


def _scalar(scalars: dict[str, Any] | None, name: str) -> float | None:
    if not scalars or name not in scalars:
        return None
    return db_float(scalars[name])


def _rollups(
    conn: Any,
    run_id: str,
    kind: str,
    series_id: int,
    stat: str,
    rank: int,
    start: int | None,
    end: int | None,
) -> list[dict[str, Any]]:
    where = [
        Rollup.run_id == run_id,
        Rollup.series == kind,
        Rollup.series_id == series_id,
        Rollup.stat == stat,
        Rollup.rank == rank,
    ]
    if start is not None:
        where.append(Rollup.bucket_end >= start)
    if end is not None:
        where.append(Rollup.bucket_start <= end)
    return [
        {"step": r.bucket_start, "value": r.mean, "min": r.min, "max": r.max}
        for r in conn.execute(select(Rollup.__table__).where(*where).order_by(Rollup.bucket_start))
    ]


def _order(value: float | None) -> float:
    """Sort key where NaN ranks above +Inf: a NaN in a bucket is kept as the bucket's maximum."""
    if value is None:
        return -math.inf
    return math.inf if value != value else value


def downsample(points: Sequence[dict[str, Any]], max_points: int) -> list[dict[str, Any]]:
    """At most ``max_points`` points: per bucket of steps, the minimum and the maximum, in step order.

    Averaging would hide exactly what this tool is for (a spike, a NaN), so extremes are kept instead.
    """
    n = len(points)
    if n <= max_points:
        return list(points)
    buckets = max(1, max_points // 2)
    out: list[dict[str, Any]] = []
    for b in range(buckets):
        chunk = [p for p in points[b * n // buckets : (b + 1) * n // buckets] if p["value"] is not None]
        if not chunk:
            continue
        lo = min(chunk, key=lambda p: _order(p["value"]))
        hi = max(chunk, key=lambda p: _order(p["value"]))
        out.extend(sorted({id(lo): lo, id(hi): hi}.values(), key=lambda p: p["step"]))
    return out


def _downsampled_in_postgresql(conn: Connection, raw: Select[Any], max_points: int) -> list[tuple[int, float]]:
    """What :func:`downsample` keeps, chosen by PostgreSQL: only the kept points cross the connection.

    A run of 10M layer-rows has ~50k points per layer; sending them all and bucketing in Python took ~1 s.
    Same buckets (point ``i`` of ``n`` in bucket ``((i + 1) * buckets - 1) // n``); per bucket one pass of
    ``min``/``max`` over ``[value, step]`` arrays picks the first minimum and the first maximum in step order
    (window functions that rank each bucket sorted every point twice: ~200 ms at 50k). PostgreSQL, too,
    orders NaN above +Inf.
    """
    buckets = max(1, max_points // 2)
    pts = raw.order_by(raw.selected_columns[0]).limit(MAX_POINTS).subquery()
    step, value = pts.c[0], pts.c[1]
    n = func.count().over()
    numbered = select(
        value.label("value"),
        cast(step, Double).label("step"),
        n.label("n"),
        ((func.row_number().over(order_by=step) * buckets - 1) // n).label("bucket"),
    ).subquery()
    v, st = numbered.c.value, numbered.c.step
    groups = conn.execute(
        select(func.min(array([v, st])), func.max(array([v, -st])), func.max(numbered.c.n)).group_by(
            numbered.c.bucket
        )
    ).all()
    if not groups or groups[0][2] <= max_points:
        return [(s, v) for s, v in conn.execute(raw.order_by(raw.selected_columns[0]).limit(MAX_POINTS))]
    kept = {int(lo[1]): lo[0] for lo, _, _ in groups} | {int(-hi[1]): hi[0] for _, hi, _ in groups}
    return sorted(kept.items())


def latest(engine: Engine, run_id: str, *, rank: int, lookback: int) -> dict[str, Any]:
    """Each layer's most recent measured value of every statistic within the last ``lookback`` steps.

    What a live view needs in one read: a layer's dead_frac is measured only at window ends, its other
    statistics every step, so "latest" is per statistic.
    """
    with engine.connect() as conn:
        last_step = conn.scalar(select(Run.last_step).where(Run.id == run_id))
        if last_step is None and conn.scalar(select(Run.id).where(Run.id == run_id)) is None:
            raise NotFound(f"run {run_id!r} not found")
        layers = conn.execute(
            select(Layer.id, Layer.index, Layer.name, Layer.type, Layer.kind)
            .where(Layer.run_id == run_id)
            .order_by(Layer.index, Layer.id)  # model (execution) order, as the run detail lists them
        ).all()
        stat_cols = [layer_stats.c[name] for name in wire.LAYER_STATS]
        rows = conn.execute(
            select(layer_stats.c.layer_id, layer_stats.c.step, *stat_cols)
            .where(
                layer_stats.c.run_id == run_id,
                layer_stats.c.rank == rank,
                layer_stats.c.step >= (last_step or 0) - lookback,
            )
            .order_by(layer_stats.c.step)
        ).all()
    values: dict[int, dict[str, Any]] = {}
    for layer_id, step, *stats in rows:
        seen = values.setdefault(layer_id, {})
        for name, raw in zip(wire.LAYER_STATS, stats, strict=True):
            if raw is not None:
                seen[name] = db_float(raw)
                seen["step"] = step
    return {
        "run_id": run_id,
        "rank": rank,
        "last_step": last_step,
        "layers": [
            {"name": name, "index": index, "type": type_, "kind": kind, **values.get(layer_id, {})}
            for layer_id, index, name, type_, kind in layers
        ],
    }
