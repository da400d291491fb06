"""Pictures of a run, for people who look rather than read: a health map and per-layer distributions over time.

The health map is three layers x steps heatmaps side by side: ``dead_frac`` and ``sat_frac`` per watched layer,
and log10 of the gradient norm per parameter-owning module (the norm of all its parameters' gradients), rows in
model (execution) order, steps bucketed into at most ``columns`` columns by the database
(:mod:`layerwatch_server.storage.heatmap`: only the buckets are read, not the run's rows; a bucket shows its
worst value: the largest fraction, the largest norm; grey: nothing measured, or a zero gradient), ``dead_frac``
filled over the window each value closes, alert onsets marked where their layer's row meets their step. The
distribution picture is one layer's histograms (``storage.histograms``) as bins x steps, each step's counts as
shares of its elements on a log colour scale. Both are PNG bytes, drawn with matplotlib's Agg backend (a
dependency of mlflow, which the collector depends on); nothing here runs on the ingest path.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from layerwatch_server.storage import heatmap, histograms
from layerwatch_server.storage.models import AlertRow, Layer, Param

MAP_STATS = ("dead_frac", "log10 grad_norm", "sat_frac")
# Where a rule's onset is marked: the panel of the statistic it judges (other layer rules: the first panel).
ONSET_PANEL = {
    "saturation": "sat_frac",
    "exploding_gradients": "log10 grad_norm",
    "vanishing_gradients": "log10 grad_norm",
}


@dataclass
class Panel:
    """One heatmap: ``values[row][column]`` (None where nothing was measured), rows named, columns by step."""

    stat: str
    rows: list[str]
    values: list[list[float | None]]
    onsets: list[tuple[int, int]] = field(default_factory=list)  # (row, column) of each alert's onset


@dataclass
class HealthMap:
    steps: list[int]  # each column's last step
    panels: list[Panel]


def health_map(engine: Engine, run_id: str, *, rank: int = 0, columns: int = 200) -> HealthMap:
    """The health map's numbers (what :func:`render_health_map` draws), bucketed by the database
    (:mod:`layerwatch_server.storage.heatmap`): at most rows x columns values per panel are read, whatever the
    run's length."""
    with engine.connect() as conn:
        layers = conn.execute(
            select(Layer.id, Layer.name).where(Layer.run_id == run_id).order_by(Layer.index, Layer.id)
        ).all()
        params = conn.execute(
            select(Param.id, Param.name).where(Param.run_id == run_id).order_by(Param.index, Param.id)
        ).all()
        modules: dict[str, int] = {}
        module_of = {pid: modules.setdefault(_module(name), len(modules)) for pid, name in params}
        buckets = heatmap.health_buckets(conn, run_id, rank, columns, module_of)
        alerts = conn.execute(
            select(AlertRow.rule, AlertRow.layer_key, AlertRow.step).where(
                AlertRow.run_id == run_id, AlertRow.step.is_not(None)
            )
        ).all()
    if buckets is None:
        return HealthMap([], [Panel(stat, [], []) for stat in MAP_STATS])
    cols = buckets.columns
    width = cols.width

    def grid(rows: int) -> list[list[float | None]]:
        return [[None] * width for _ in range(rows)]

    dead, sat, grads = grid(len(layers)), grid(len(layers)), grid(len(modules))
    for i, (layer_id, _) in enumerate(layers):
        for col in range(width):
            dead[i][col], sat[i][col] = buckets.layers.get((layer_id, col), (None, None))
    for (row, col), total in buckets.squares.items():  # the largest sum of squares is the largest norm
        grads[row][col] = math.log10(math.sqrt(total))
    for row in dead:  # dead_frac is measured at a window's end and holds for the window's steps before it
        later = None
        for col in range(width - 1, -1, -1):
            later = row[col] = row[col] if row[col] is not None else later
    panels = [
        Panel("dead_frac", [name for _, name in layers], dead),
        Panel("log10 grad_norm", list(modules), grads),
        Panel("sat_frac", [name for _, name in layers], sat),
    ]
    by_stat = {panel.stat: panel for panel in panels}
    for rule, key, step in alerts:  # each onset on the panel of the statistic its rule judges
        panel = by_stat[ONSET_PANEL.get(rule, "dead_frac")]
        if key in panel.rows and cols.first <= step <= cols.last:
            panel.onsets.append((panel.rows.index(key), cols.of(step)))
    return HealthMap(buckets.steps, panels)


def render_health_map(data: HealthMap, title: str = "") -> bytes:
    plt = _pyplot()
    import numpy as np

    rows = max((len(panel.rows) for panel in data.panels), default=1)
    fig, axes = plt.subplots(1, len(data.panels), figsize=(15, max(3.0, 0.25 * rows + 1.5)), squeeze=False)
    for ax, panel in zip(axes[0], data.panels, strict=True):
        values = np.array([[math.nan if v is None else v for v in row] for row in panel.values], dtype=float)
        if values.size == 0:
            values = np.full((1, 1), math.nan)
        fraction = panel.stat != "log10 grad_norm"
        cmap = plt.get_cmap("magma_r" if fraction else "viridis").with_extremes(bad="#dddddd")  # grey: not measured
        image = ax.imshow(
            values,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=0 if fraction else None,
            vmax=1 if fraction else None,
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(panel.stat)
        ax.set_yticks(range(len(panel.rows)), panel.rows, fontsize=7)
        _step_ticks(ax, data.steps)
        for row, col in panel.onsets:
            ax.plot(col, row, marker="v", color="#00c8ff", markersize=7, markeredgecolor="black")
    if title:
        fig.suptitle(title, y=1.03)
    return _png(fig)


def distribution(engine: Engine, run_id: str, layer: str, kind: str, *, columns: int = 200) -> dict[str, Any]:
    return histograms.read(engine, run_id, layer=layer, kind=kind, max_points=columns)


def render_distribution(data: dict[str, Any], title: str = "") -> bytes:
    """Bins (rows, most negative at the bottom) x steps; colour: log10 of each bin's share of its step."""
    plt = _pyplot()
    import numpy as np

    counts = np.array(data["counts"], dtype=float).T  # (bins, steps)
    totals = counts.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(counts > 0, np.log10(counts / np.where(totals > 0, totals, 1)), np.nan)
    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#f4f4f4")  # empty bin
    image = ax.imshow(shares, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap, vmin=-6, vmax=0)
    fig.colorbar(image, ax=ax, label="log10 share of the step's elements")
    edges = data["edges"]
    ticks = [i for i in range(len(edges) + 1) if i % 8 == 0 or i == len(edges) // 2]
    ax.set_yticks(ticks, [_bin_label(edges, i) for i in ticks], fontsize=7)
    _step_ticks(ax, data["steps"])
    ax.set_title(title or "distribution over steps")
    return _png(fig)


def _bin_label(edges: list[float], i: int) -> str:
    if i == 0:
        return f"<= {edges[0]:.3g}"
    if i == len(edges):
        return f">= {edges[-1]:.3g}"
    lo, hi = edges[i - 1], edges[i]
    return "0" if lo < 0 < hi else f"{lo:.2g}..{hi:.2g}"


def _step_ticks(ax: Any, steps: list[int]) -> None:
    if not steps:
        return
    every = max(1, len(steps) // 8)
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], fontsize=7)
    ax.set_xlabel("step")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _module(param_name: str) -> str:
    owner, _, _ = param_name.rpartition(".")
    return owner or param_name
