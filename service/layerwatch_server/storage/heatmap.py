"""The health map's numbers bucketed by the database: per row (a layer, a module) and column of steps only the
bucket's largest value crosses the connection, not every row of the run (10M rows for a long run, redrawn by
the mirror every few minutes).

Columns as :mod:`layerwatch_server.pictures` draws them: the distinct steps of a rank's ``layer_stats`` and
``param_stats`` rows, ``first`` to ``last``, cut into ``width`` spans of ``span`` steps; step ``s`` falls in column
``min(width - 1, int((s - first) / span))``, the same double arithmetic in SQL as in Python. One grouping
statement per table, the same on SQLite and PostgreSQL (only ``int()`` is spelled per dialect); a NaN is
compared as it is stored (``'NaN'`` text on SQLite, a NaN that sorts above everything on PostgreSQL), so it
never wins a bucket's ``max``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Double,
    Integer,
    case,
    cast,
    column,
    func,
    literal,
    null,
    select,
    union,
    values,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from layerwatch_server.storage.base import NanFloat
from layerwatch_server.storage.models import Layer, Param, layer_stats, param_stats

# A gradient norm is squared as (norm * 2**-8) ** 2, and Python multiplies the bucket's sum back by 2**16: the
# same double as norm * norm (scaling by a power of two is exact, for any norm above ~1e-150), but a sum of a
# module's squares cannot overflow, which PostgreSQL reports as an error where Python gives inf. A norm from
# 2**512 up squares to inf in Python, so it is inf here.
GRAD_SCALE = 2.0**-8
UNSCALE = 2.0**16
SQUARE_OVERFLOW = 2.0**512


@dataclass(frozen=True)
class Columns:
    first: int
    last: int
    width: int
    span: float

    def of(self, step: int) -> int:
        return min(self.width - 1, int((step - self.first) / self.span))


@dataclass
class Buckets:
    columns: Columns
    steps: list[int]  # each column's last step (0 for a column no step falls in)
    layers: dict[tuple[int, int], tuple[float | None, float | None]]  # (layer id, column): worst dead_frac, sat_frac
    squares: dict[tuple[int, int], float]  # (module, column): the largest sum of a module's squared norms at a step


class _whole(FunctionElement[int]):
    """``int(x)`` of a double ``x >= 0``: SQLite's CAST truncates, PostgreSQL's rounds (so floor it first)."""

    type = BigInteger()
    inherit_cache = True


@compiles(_whole)
def _whole_sqlite(element: _whole, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS BIGINT)"


@compiles(_whole, "postgresql")
def _whole_postgresql(element: _whole, compiler: Any, **kw: Any) -> str:
    return f"CAST(floor({compiler.process(element.clauses, **kw)}) AS BIGINT)"


def _measured(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """The value, NULL where it is NaN (or NULL)."""
    return case((value != literal(math.nan, NanFloat()), value))


def health_buckets(conn: Connection, run_id: str, rank: int, columns: int, module_of: dict[int, int]) -> Buckets | None:
    """The health map's buckets of ``rank``'s rows (None when it has none): per layer id and column the largest
    ``dead_frac`` and ``sat_frac`` that is not NaN, and per module (``module_of``: parameter id to module) and
    column the largest sum over its parameters of ``grad_norm ** 2`` at one step, where that sum is above 0
    and none of the norms summed is NaN.

    Each table is read once when the run's steps are as usual: the first and last step are each series' ends in
    its primary key, and a run of at least ``columns`` steps whose every column holds one needs no count of
    its steps. Otherwise (few or scattered steps, rows of a series the run does not list) the steps are counted
    in one more read, and the buckets read again if the columns were not what they turned out to be."""
    ends = _ends(conn, run_id, rank)
    counted = None
    if ends is None or ends[1] - ends[0] + 1 < columns:  # fewer steps than columns: how many decides the columns
        counted = _count(conn, run_id, rank, columns)
        if counted is None:
            return None
    cols = counted or Columns(ends[0], ends[1], columns, (ends[1] - ends[0] + 1) / columns)
    layers, params = _read(conn, run_id, rank, cols, module_of)
    seen = {col for _, col, *_ in layers} | {col for _, col, *_ in params}
    lows, highs = zip(*((low, high) for _, _, low, high, *_ in (*layers, *params)), strict=True)
    if counted is None and (min(lows) < cols.first or max(highs) > cols.last or len(seen) < cols.width):
        counted = _count(conn, run_id, rank, columns)
        if counted != cols:
            assert counted is not None  # there are rows
            cols = counted
            layers, params = _read(conn, run_id, rank, cols, module_of)
    steps = [0] * cols.width
    for _, col, _, high, *_ in (*layers, *params):
        steps[col] = max(steps[col], high)
    return Buckets(
        cols,
        steps,
        {(layer_id, col): (dead, sat) for layer_id, col, _, _, dead, sat in layers},
        {
            (row, col): float(worst) * UNSCALE  # inf where Python's sum of squares overflowed
            for row, col, _, _, worst in params
            if row is not None and worst is not None
        },
    )


def _ends(conn: Connection, run_id: str, rank: int) -> tuple[int, int] | None:
    """The first and the last step of the run's layers and parameters, from each one's ends in the primary key
    (the run's only rows, as ingest writes them); None without any."""
    found = []
    for table, key, model in ((layer_stats, "layer_id", Layer), (param_stats, "param_id", Param)):
        c = table.c
        where = (c.run_id == run_id, c[key] == model.id, c.rank == rank)
        ends = select(
            select(func.min(c.step)).where(*where).scalar_subquery().label("low"),
            select(func.max(c.step)).where(*where).scalar_subquery().label("high"),
        ).where(model.run_id == run_id)
        per_series = ends.subquery()
        found.append(conn.execute(select(func.min(per_series.c.low), func.max(per_series.c.high))).one())
    lows = [low for low, _ in found if low is not None]
    highs = [high for _, high in found if high is not None]
    return (min(lows), max(highs)) if lows else None


def _unlisted(conn: Connection, run_id: str, listed: set[int]) -> bool:
    """Whether the run has ``param_stats`` rows of a parameter id not ``listed`` (ingest writes none): its
    distinct ids walked in the primary key, one index probe each."""
    c = param_stats.c
    ids = select(func.min(c.param_id).label("id")).where(c.run_id == run_id).cte("ids", recursive=True)
    after = select(func.min(c.param_id)).where(c.run_id == run_id, c.param_id > ids.c.id).scalar_subquery()
    ids = ids.union_all(select(after).where(ids.c.id.is_not(None)))
    return any(i is not None and i not in listed for i in conn.scalars(select(ids.c.id)))


def _count(conn: Connection, run_id: str, rank: int, columns: int) -> Columns | None:
    """The columns from the distinct steps of every row of ``rank`` (None without rows)."""
    t, p = layer_stats.c, param_stats.c
    steps = union(
        select(t.step).where(t.run_id == run_id, t.rank == rank).group_by(t.step),
        select(p.step).where(p.run_id == run_id, p.rank == rank).group_by(p.step),
    ).subquery()
    first, last, n = conn.execute(select(func.min(steps.c.step), func.max(steps.c.step), func.count())).one()
    if not n:
        return None
    width = max(1, min(columns, n))
    return Columns(first, last, width, (last - first + 1) / width)


def _read(
    conn: Connection, run_id: str, rank: int, cols: Columns, module_of: dict[int, int]
) -> tuple[list[Any], list[Any]]:
    """Per (layer id, column): its lowest and highest step, largest dead_frac and sat_frac; per (module,
    column): its lowest and highest step and its worst sum of (scaled) squares. A step outside ``cols`` lands
    in a column outside it (the caller counts the steps, then)."""
    t, p = layer_stats.c, param_stats.c
    width = cols.width

    def column_of(step: ColumnElement[int]) -> ColumnElement[int]:
        at = _whole(cast(step - cols.first, Double) / literal(cols.span, Double))
        return case((at > width - 1, width - 1), else_=at)

    layer_rows = (
        select(t.layer_id, t.step, column_of(t.step).label("col"), t.dead_frac, t.sat_frac)
        .where(t.run_id == run_id, t.rank == rank)
        .subquery()
    )
    r = layer_rows.c
    layers = conn.execute(
        select(
            r.layer_id,
            r.col,
            func.min(r.step),
            func.max(r.step),
            func.max(_measured(r.dead_frac)),
            func.max(_measured(r.sat_frac)),
        ).group_by(r.layer_id, r.col)
    ).all()

    norm = p.grad_norm
    is_nan = norm == literal(math.nan, NanFloat())
    square = case(
        (is_nan, null()),
        (func.abs(norm) >= SQUARE_OVERFLOW, literal(math.inf, Double)),
        else_=(norm * GRAD_SCALE) * (norm * GRAD_SCALE),
    )
    size = Counter(module_of.values())
    if module_of:
        spec = column("param_id", Integer), column("module", Integer), column("shared", Integer)
        owners = values(*spec, name="modules", literal_binds=True)
        owners = owners.data([(pid, row, int(size[row] > 1)) for pid, row in module_of.items()]).cte("modules")
        if _unlisted(conn, run_id, set(module_of)):  # their rows count as steps: every row is read
            source = param_stats.outerjoin(owners, owners.c.param_id == p.param_id)
        else:  # each parameter's rows by the primary key (SQLite would scan the list for every row)
            source = owners.join(param_stats, owners.c.param_id == p.param_id)
        module, shared = owners.c.module, func.coalesce(owners.c.shared, 0)
    else:
        source, module, shared = param_stats, null(), literal(0)
    if not any(n > 1 for n in size.values()):  # a module's worst square is its worst sum: one grouping, as layers'
        one = (
            select(module.label("module"), p.step, column_of(p.step).label("col"), square.label("square"))
            .select_from(source)
            .where(p.run_id == run_id, p.rank == rank)
            .subquery()
        )
        worst = func.max(case((one.c.square > 0, one.c.square)))
        grouped = select(one.c.module, one.c.col, func.min(one.c.step), func.max(one.c.step), worst)
        return layers, conn.execute(grouped.group_by(one.c.module, one.c.col)).all()
    # A module of several parameters is summed per step, then the worst step per column is found (grouping by a
    # key PostgreSQL cannot count, it sorts the rows); a module of one (and a parameter the run does not list:
    # only its steps count) goes to its columns at once, its worst square being its worst sum.
    rows = (
        select(
            module.label("module"),
            shared.label("shared"),
            p.step,
            case((shared == 1, p.step), else_=column_of(p.step)).label("at"),
            square.label("square"),
            case((is_nan, 1), else_=0).label("nan"),
        )
        .select_from(source)
        .where(p.run_id == run_id, p.rank == rank)
        .subquery()
    )
    per_step = (
        select(
            rows.c.module,
            rows.c.shared,
            rows.c.at,
            func.min(rows.c.step).label("low"),
            func.max(rows.c.step).label("high"),
            func.sum(rows.c.square).label("total"),
            func.max(rows.c.square).label("peak"),
            func.max(rows.c.nan).label("nan"),
        )
        .group_by(rows.c.module, rows.c.shared, rows.c.at)
        .subquery()
    )
    s = per_step.c
    summed = case(((s.nan == 0) & (s.total > 0), s.total))
    in_column = select(
        s.module,
        case((s.shared == 1, column_of(s.at)), else_=s.at).label("col"),
        s.low,
        s.high,
        case((s.shared == 1, summed), else_=case((s.peak > 0, s.peak))).label("worst"),
    ).subquery()
    c = in_column.c
    params = conn.execute(
        select(c.module, c.col, func.min(c.low), func.max(c.high), func.max(c.worst)).group_by(c.module, c.col)
    ).all()
    return layers, params
