"""The health map's numbers bucketed by the database: per row (a layer, a module) and column of steps only the
bucket's largest value crosses the connection, not every row of the run (10M rows for a long run, redrawn by
the mirror every few minutes).

Columns as :mod:`layerwatch_server.pictures` draws them: the distinct steps of a rank's ``layer_stats`` and
``param_stats`` rows, ``first`` to ``last``, cut into ``width`` spans of ``span`` steps; step ``s`` falls in column
``min(width - 1, int((s - first) / span))``, the same double arithmetic in SQL as in Python. One grouping
statement per table, the same on SQLite and PostgreSQL (only ``int()`` is spelled per dialect); a NaN is
compared as it is stored (``'NaN'`` text on SQLite, a NaN that sorts above everything on PostgreSQL), so it
never wins a bucket's ``max``. Only rows of the run's own layers and parameters exist (ingest writes no other).
"""

from __future__ import annotations

import dataclasses
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
    Row,
    Select,
    case,
    cast,
    column,
    func,
    literal,
    select,
    union,
    union_all,
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

    @property
    def span(self) -> float:
        return (self.last - self.first + 1) / self.width

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


def health_buckets(conn: Connection, run_id: str, rank: int, columns: int, module_of: dict[int, int]) -> Buckets | None:
    """The health map's buckets of ``rank``'s rows (None when it has none): per layer id and column the largest
    ``dead_frac`` and ``sat_frac`` that is not NaN, and per module (``module_of``: parameter id to module) and
    column the largest sum over its parameters of ``grad_norm ** 2`` at one step, where that sum is above 0
    and none of the norms summed is NaN.

    The number of distinct steps sets the columns, and counting them reads every row once more (the primary key
    orders a run's rows by series, not by rank and step: 40% more time on PostgreSQL, 20% on SQLite), so the
    buckets are read first as though there were a step for each column; only when a column comes out empty
    are the steps counted (and, if fewer, the buckets read again)."""
    ends = _ends(conn, run_id, rank)
    if ends is None:
        return None
    first, last = ends
    cols = Columns(first, last, min(columns, last - first + 1))  # no more columns than steps between the ends
    layers, params = _read(conn, run_id, rank, cols, module_of)
    if len({col for _, col, *_ in (*layers, *params)}) < cols.width:
        width = min(cols.width, _count(conn, run_id, rank))
        if width < cols.width:
            cols = dataclasses.replace(cols, width=width)
            layers, params = _read(conn, run_id, rank, cols, module_of)
    steps = [0] * cols.width
    for _, col, last_step, *_ in (*layers, *params):
        steps[col] = max(steps[col], last_step)
    return Buckets(
        cols,
        steps,
        {(layer_id, col): (dead, sat) for layer_id, col, _, dead, sat in layers},
        # inf where Python's sum of squares overflowed; a worst of 0: every norm of the bucket was 0
        {(module, col): float(worst) * UNSCALE for module, col, _, worst in params if worst},
    )


def _ends(conn: Connection, run_id: str, rank: int) -> tuple[int, int] | None:
    """The first and the last step of ``rank``'s rows (None without any), from each series' ends in the primary
    key: two index probes a series, not a read of its rows."""
    per_series = []
    for table, key, model in ((layer_stats, "layer_id", Layer), (param_stats, "param_id", Param)):
        c = table.c
        where = (c.run_id == run_id, c[key] == model.id, c.rank == rank)
        low = select(func.min(c.step)).where(*where).scalar_subquery().label("low")
        high = select(func.max(c.step)).where(*where).scalar_subquery().label("high")
        per_series.append(select(low, high).where(model.run_id == run_id))
    ends = union_all(*per_series).subquery()
    first, last = conn.execute(select(func.min(ends.c.low), func.max(ends.c.high))).one()
    return None if first is None else (first, last)


def _count(conn: Connection, run_id: str, rank: int) -> int:
    """How many distinct steps ``rank``'s rows have."""
    t, p = layer_stats.c, param_stats.c
    steps = union(
        select(t.step).where(t.run_id == run_id, t.rank == rank).group_by(t.step),
        select(p.step).where(p.run_id == run_id, p.rank == rank).group_by(p.step),
    ).subquery()
    return conn.execute(select(func.count()).select_from(steps)).scalar_one()


def _read(
    conn: Connection, run_id: str, rank: int, cols: Columns, module_of: dict[int, int]
) -> tuple[list[Row[Any]], list[Row[Any]]]:
    """Per (layer id, column): its last step, largest dead_frac and sat_frac; per (module, column): its last step
    and its worst sum of (scaled) squares."""
    t = layer_stats.c
    measured = select(t.layer_id, t.step, _measured(t.dead_frac).label("dead"), _measured(t.sat_frac).label("sat"))
    layers = _worst(conn, cols, measured.where(t.run_id == run_id, t.rank == rank))
    return layers, _worst(conn, cols, _module_squares(run_id, rank, module_of)) if module_of else []


def _worst(conn: Connection, cols: Columns, rows: Select[Any]) -> list[Row[Any]]:
    """``rows`` of (map row, step, values...) grouped per map row and column: its last step, each value's
    largest."""
    at = _column(cols, rows.selected_columns[1])
    key, step, *worst, col = rows.add_columns(at.label("col")).subquery().c
    return conn.execute(select(key, col, func.max(step), *map(func.max, worst)).group_by(key, col)).all()


def _module_squares(run_id: str, rank: int, module_of: dict[int, int]) -> Select[Any]:
    """Per module and step the sum of its parameters' (scaled) squared norms, NULL where one of them is NaN: a
    module of one parameter's rows as they are, the others' summed (apart: PostgreSQL sorts the rows it groups
    per step, 10M in a long run)."""
    norm = param_stats.c.grad_norm
    is_nan = norm == literal(math.nan, NanFloat())
    square = case(
        (is_nan, None),
        (func.abs(norm) >= SQUARE_OVERFLOW, literal(math.inf, Double)),
        else_=(norm * GRAD_SCALE) * (norm * GRAD_SCALE),
    )
    size = Counter(module_of.values())
    alone = [(param_id, module) for param_id, module in module_of.items() if size[module] == 1]
    shared = [(param_id, module) for param_id, module in module_of.items() if size[module] > 1]
    parts = []
    if alone:
        parts.append(_rows_of(run_id, rank, alone, "alone").add_columns(square.label("square")))
    if shared:
        rows = _rows_of(run_id, rank, shared, "shared")
        summed = case((func.max(case((is_nan, 1), else_=0)) == 0, func.sum(square)))
        parts.append(rows.add_columns(summed.label("square")).group_by(*rows.selected_columns))
    return parts[0] if len(parts) == 1 else select(union_all(*parts).subquery())


def _rows_of(run_id: str, rank: int, owned: list[tuple[int, int]], name: str) -> Select[Any]:
    """(module, step) of ``rank``'s rows of the ``owned`` (parameter id, module): each parameter's rows found by
    the primary key, not each row's parameter looked up in the list (on SQLite ~2 s instead of 13 s, 400k rows)."""
    p = param_stats.c
    spec = column("param_id", Integer), column("module", Integer)
    owners = values(*spec, name=name, literal_binds=True).data(owned).cte(name)
    rows = select(owners.c.module, p.step).join_from(owners, param_stats, owners.c.param_id == p.param_id)
    return rows.where(p.run_id == run_id, p.rank == rank)


def _column(cols: Columns, step: ColumnElement[int]) -> ColumnElement[int]:
    at = _whole(cast(step - cols.first, Double) / literal(cols.span, Double))
    return case((at > cols.width - 1, cols.width - 1), else_=at)


def _measured(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """The value, NULL where it is NaN (or NULL)."""
    return case((value != literal(math.nan, NanFloat()), value))
