"""Stored rows -> MLflow metric tuples for one run: budgeted keys, run-level aggregates, no NaN/Inf.

A non-finite value is never logged (MLflow stores Inf as the largest float, and a NaN metric can break
the run page): it is counted, per step in ``layerwatch/nonfinite_values`` and per run in tags.
Downsampling by ``stride`` keeps every step whose number is a multiple of it; statistics measured only
now and then (``dead_frac`` at window ends, full parameter statistics) are kept whenever measured.
A ``window`` above 1 (the mirror's pace, :func:`pace_window`) keeps the first reported step of every
``window`` step numbers, and each sparse statistic's first measurement in it; non-finite counts always go out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerwatch import wire
from layerwatch_server.mirrors import naming
from layerwatch_server.mirrors.naming import Budget, SeriesDef

# Not measured at every step: mirrored whenever present, whatever the stride.
SPARSE_STATS = frozenset({"dead_frac", "weight_norm", "grad_max_abs", "grad_nonfinite"})
STEP_STATS = wire.STEP_STATS
MAX_USER_SCALARS = 100

Metric = tuple[str, float, int, int]  # key, value, timestamp (ms), step


@dataclass
class Converted:
    metrics: list[Metric] = field(default_factory=list)
    nonfinite_values: int = 0
    first_nonfinite: tuple[int, str] | None = None  # (step, key) of the first value left out

    def add(self, key: str, value: float | None, ts: int, step: int) -> None:
        if value is None:
            return
        if math.isfinite(value):
            self.metrics.append((key, float(value), ts, step))
            return
        self.nonfinite_values += 1
        if self.first_nonfinite is None:
            self.first_nonfinite = (step, key)


def convert(
    steps: Iterable[Mapping[str, Any]],
    layer_rows: Mapping[int, list[tuple[int, Mapping[str, float | None]]]],
    param_rows: Mapping[int, list[tuple[int, Mapping[str, float | None]]]],
    budget: Budget,
    layers: Mapping[int, SeriesDef],
    stride: int = 1,
    window: int = 1,
    kept: Iterable[int] | None = None,
) -> Converted:
    """``steps``: step rows (step, time, loss, lr, grad_norm_total, scalars); ``*_rows[step]``: (id, stats);
    ``kept``: the steps whose every statistic goes out at ``window`` (:func:`kept_steps`), None for all."""
    out = Converted()
    first = None if kept is None else set(kept)
    sparse_sent: dict[str, int] = {}  # sparse stat -> the window it last went out in (window > 1)
    for s in steps:
        step, ts = int(s["step"]), int(float(s["time"]) * 1000)
        w = step // window
        dense = step % stride == 0 and (first is None or step in first)
        sparse = SPARSE_STATS if window == 1 else frozenset(k for k in SPARSE_STATS if sparse_sent.get(k) != w)
        before = out.nonfinite_values
        if dense:
            for stat in STEP_STATS:
                out.add(stat, s.get(stat), ts, step)
            for name, v in list((s.get("scalars") or {}).items())[:MAX_USER_SCALARS]:
                out.add(naming.safe_key(str(name)), _num(v), ts, step)
        agg = _Aggregates()
        sent: set[str] = set()
        for layer_id, stats in layer_rows.get(step, ()):
            agg.layer(stats, layers.get(layer_id))
            _add_series(out, budget.layer_keys, layer_id, stats, ts, step, dense, sparse, sent)
        for param_id, stats in param_rows.get(step, ()):
            agg.param(stats)
            _add_series(out, budget.param_keys, param_id, stats, ts, step, dense, sparse, sent)
        agg.emit(out, ts, step, dense, sparse_dead="dead_frac" in sparse)
        sparse_sent.update(dict.fromkeys(sent, w))
        if dense or out.nonfinite_values > before:
            out.metrics.append((naming.AGG_NONFINITE_VALUES, float(out.nonfinite_values - before), ts, step))
    return out


def _add_series(
    out: Converted,
    keys: Mapping[tuple[int, str], str],
    series_id: int,
    stats: Mapping[str, float | None],
    ts: int,
    step: int,
    dense: bool,
    sparse: frozenset[str],
    sent: set[str],
) -> None:
    for stat, value in stats.items():
        key = keys.get((series_id, stat))
        if key is None or value is None:
            continue
        if stat in SPARSE_STATS:
            if stat not in sparse:
                continue
            sent.add(stat)
        elif not dense:
            continue
        out.add(key, value, ts, step)


class _Aggregates:
    """Run-level figures over every layer/parameter of a step, budget or not."""

    def __init__(self) -> None:
        self.dead_max: float | None = None
        self.dead_units = 0.0
        self.units = 0
        self.grad_max: float | None = None
        self.nonfinite: float | None = None

    def layer(self, stats: Mapping[str, float | None], layer: SeriesDef | None) -> None:
        dead = stats.get("dead_frac")
        if dead is not None:
            self.dead_max = dead if self.dead_max is None or not dead <= self.dead_max else self.dead_max
            if layer is not None and layer.units > 0:
                self.dead_units += dead * layer.units
                self.units += layer.units
        self._count(stats.get("nonfinite"))

    def param(self, stats: Mapping[str, float | None]) -> None:
        g = stats.get("grad_norm")
        if g is not None:
            self.grad_max = g if self.grad_max is None or not g <= self.grad_max else self.grad_max
        self._count(stats.get("grad_nonfinite"))

    def _count(self, n: float | None) -> None:
        if n is not None:
            self.nonfinite = (self.nonfinite or 0.0) + n

    def emit(self, out: Converted, ts: int, step: int, dense: bool, *, sparse_dead: bool = True) -> None:
        # dead_frac is sparse: its aggregates go out whenever it was measured (and its window's is due)
        if sparse_dead:
            out.add(naming.AGG_DEAD_FRAC_MAX, self.dead_max, ts, step)
            if self.units:
                out.add(naming.AGG_DEAD_UNITS_FRAC, self.dead_units / self.units, ts, step)
        if dense:
            out.add(naming.AGG_GRAD_NORM_MAX, self.grad_max, ts, step)
        if dense or (self.nonfinite or 0) > 0:
            out.add(naming.AGG_NONFINITE_COUNT, self.nonfinite, ts, step)


def pace_window(n_steps: int, span: int, per_step: int, budget: int) -> int:
    """The smallest power of two ``window`` whose kept steps (at most one per ``window`` step numbers of the
    ``span`` read) carry at most ``budget`` metrics of ``per_step`` each; 1 while all ``n_steps`` fit.

    A power of two, so the kept steps of consecutive ticks at the same pace line up on one grid.
    """
    if n_steps * per_step <= budget:
        return 1
    window = 2
    while (span // window + 1) * per_step > budget and window < span:
        window *= 2
    return window


def kept_steps(steps: Iterable[int], window: int, after: int | None) -> list[int]:
    """The steps whose every statistic goes out at ``window``: the first reported of each window."""
    kept, prev = [], -1 if after is None else after
    for step in steps:
        if step // window != prev // window:
            kept.append(step)
        prev = step
    return kept


def _num(v: Any) -> float | None:
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):  # finite_json wrote NaN/Inf in the scalars JSON as strings
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(v)
    return None
