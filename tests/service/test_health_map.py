"""The health map bucketed by the database equals the health map the collector used to compute in Python.

``reference_health_map`` is that Python, as it was (every layer and parameter row of the run read, bucketed per
row): the straightforward definition the SQL of ``storage.heatmap`` must agree with, on a run with awkward data.
``bench/series.py`` times it beside the new one. The runs are as ingest writes them: every row is of a layer or
parameter the run lists (the old Python counted another series' steps too; there are none).
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select

from layerwatch_server import pictures
from layerwatch_server.pictures import MAP_STATS, ONSET_PANEL, HealthMap, Panel
from layerwatch_server.storage import heatmap
from layerwatch_server.storage.models import AlertRow, Layer, Param, Project, Run, layer_stats, param_stats

from .batches import unique


def reference_health_map(engine: Engine, run_id: str, *, rank: int = 0, columns: int = 200) -> HealthMap:
    """The health map as computed before the database bucketed it: every row of the run read into Python."""
    with engine.connect() as conn:
        layers = conn.execute(
            select(Layer.id, Layer.name).where(Layer.run_id == run_id).order_by(Layer.index, Layer.id)
        ).all()
        params = conn.execute(
            select(Param.id, Param.name).where(Param.run_id == run_id).order_by(Param.index, Param.id)
        ).all()
        t = layer_stats.c
        layer_rows = conn.execute(
            select(t.layer_id, t.step, t.dead_frac, t.sat_frac).where(t.run_id == run_id, t.rank == rank)
        ).all()
        p = param_stats.c
        param_rows = conn.execute(
            select(p.param_id, p.step, p.grad_norm).where(p.run_id == run_id, p.rank == rank)
        ).all()
        alerts = conn.execute(
            select(AlertRow.rule, AlertRow.layer_key, AlertRow.step).where(
                AlertRow.run_id == run_id, AlertRow.step.is_not(None)
            )
        ).all()
    all_steps = sorted({r.step for r in layer_rows} | {r.step for r in param_rows})
    if not all_steps:
        return HealthMap([], [Panel(stat, [], []) for stat in MAP_STATS])
    first, last = all_steps[0], all_steps[-1]
    width = max(1, min(columns, len(all_steps)))
    span = (last - first + 1) / width

    def column(step: int) -> int:
        return min(width - 1, int((step - first) / span))

    steps = [0] * width
    for step in all_steps:
        steps[column(step)] = step

    def grid(rows: int) -> list[list[float | None]]:
        return [[None] * width for _ in range(rows)]

    def worst(cells: list[list[float | None]], row: int, col: int, value: float | None) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        current = cells[row][col]
        cells[row][col] = value if current is None else max(current, value)

    layer_row = {layer_id: i for i, (layer_id, _) in enumerate(layers)}
    dead, sat = grid(len(layers)), grid(len(layers))
    for r in layer_rows:
        i, col = layer_row.get(r.layer_id), column(r.step)
        if i is not None:
            worst(dead, i, col, _number(r.dead_frac))
            worst(sat, i, col, _number(r.sat_frac))
    modules: dict[str, int] = {}
    module_of = {pid: modules.setdefault(_module(name), len(modules)) for pid, name in params}
    squares: dict[tuple[int, int], float] = {}
    for r in param_rows:
        norm = _number(r.grad_norm)
        if norm is not None and r.param_id in module_of:
            key = (module_of[r.param_id], r.step)
            squares[key] = squares.get(key, 0.0) + norm * norm
    grads = grid(len(modules))
    for (row, step), total in squares.items():
        worst(grads, row, column(step), math.log10(math.sqrt(total)) if total > 0 else None)
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
        if key in panel.rows and first <= step <= last:
            panel.onsets.append((panel.rows.index(key), column(step)))
    return HealthMap(steps, panels)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)  # SQLite keeps NaN as text (storage.base)
    except (TypeError, ValueError):
        return None


def _module(param_name: str) -> str:
    owner, _, _ = param_name.rpartition(".")
    return owner or param_name


# -- an awkward run ---------------------------------------------------------------------------------------------

LAYERS = ["embed", "blocks.0.fc", "blocks.0.act", "blocks.1.fc", "head", "never.reported"]
# params of one module in several rows, out of index order; a parameter without a dot is its own module
PARAMS = [
    ("embed.weight", 0),
    ("blocks.0.fc.weight", 1),
    ("blocks.0.fc.bias", 2),
    ("scale", 3),
    ("blocks.1.fc.weight", 5),
    ("blocks.0.fc.extra", 6),
    ("head.weight", 7),
    ("head.bias", 4),
]


def _fraction(rng: random.Random) -> float | None:
    roll = rng.random()
    if roll < 0.05:
        return math.nan
    if roll < 0.12:
        return None
    if roll < 0.13:
        return math.inf
    return rng.choice([0.0, 0.25, 0.5, 1.0]) if roll < 0.3 else rng.random()


def _norm(rng: random.Random) -> float | None:
    roll = rng.random()
    if roll < 0.04:
        return math.nan
    if roll < 0.1:
        return None
    if roll < 0.14:
        return 0.0
    if roll < 0.145:
        return math.inf
    if roll < 0.15:
        return rng.choice([1e200, -1e160, 2.0**512, 1.3e154])  # a square that overflows a double, or nearly
    return 10 ** rng.uniform(-12, 6)


def _build(engine: Engine, seed: int, params: list[tuple[str, int]] = PARAMS) -> str:
    """A run on ranks 0-4: rank 0 has 400 scattered steps (gaps, steps only params reported, dead_frac only at
    window ends), rank 1 five steps, rank 2 only parameter rows, rank 3 one step, rank 4 1,000 steps in a row;
    NaN, None, 0, Inf and norms whose squares overflow; alerts in and out of range."""
    rng = random.Random(seed)
    project = unique("map")
    with engine.begin() as conn:
        project_id = conn.execute(insert(Project).values(name=project).returning(Project.id)).scalar_one()
        run_id = unique("r")[:16]
        conn.execute(insert(Run).values(id=run_id, project_id=project_id, key=run_id, name=run_id))
        layer_ids = [
            conn.execute(
                insert(Layer)
                .values(run_id=run_id, index=i, name=name, type="Linear", kind="linear", shape=[4], units=4)
                .returning(Layer.id)
            ).scalar_one()
            for i, name in enumerate(LAYERS)
        ]
        param_ids = [
            conn.execute(
                insert(Param).values(run_id=run_id, index=index, name=name, shape=[4], numel=4).returning(Param.id)
            ).scalar_one()
            for name, index in params
        ]
        steps = {
            0: sorted(rng.sample(range(17, 5000), 400)),
            1: [3, 4, 9, 100, 101],
            2: sorted(rng.sample(range(0, 60), 30)),
            3: [7],
            4: list(range(100, 1100)),  # every step: the columns are known without counting the steps
        }
        layer_rows, param_rows = [], []
        for rank, rank_steps in steps.items():
            for n, step in enumerate(rank_steps):
                if rank != 2 and n % 11 != 10:  # now and then a step only the parameters reported
                    for layer_id in layer_ids[:-1]:
                        dead = _fraction(rng) if n % 5 == 4 else None  # measured at a window's end
                        row = {"layer_id": layer_id, "step": step, "dead_frac": dead, "sat_frac": _fraction(rng)}
                        layer_rows.append({"run_id": run_id, "rank": rank, "day": 0, **row})
                for param_id in param_ids:
                    param_rows.append(
                        {"run_id": run_id, "rank": rank, "day": 0, "param_id": param_id, "step": step}
                        | {"grad_norm": _norm(rng)}
                    )
        last = steps[0][-1]
        conn.execute(insert(layer_stats), layer_rows)
        conn.execute(insert(param_stats), param_rows)
        alerts = [
            ("dead_units", "blocks.0.act", steps[0][37]),
            ("dead_units", "head", last),
            ("saturation", "blocks.1.fc", steps[0][200]),
            ("exploding_gradients", "blocks.0.fc", steps[0][0]),
            ("vanishing_gradients", "scale", 4),  # before the first step of rank 0
            ("non_finite", "", steps[0][5]),  # a run-level alert: no row
            ("loss_spike", "embed", None),  # no step
            ("dead_units", "nope", steps[0][9]),
        ]
        for i, (rule, key, step) in enumerate(alerts):
            conn.execute(
                insert(AlertRow).values(
                    id=f"{run_id[:12]}{i:04d}", run_id=run_id, project=project, rule=rule, layer_key=key,
                    severity="warning", state="firing", step=step, message="",
                )
            )  # fmt: skip
    return run_id


@pytest.fixture(scope="module")
def awkward_run(engine) -> str:
    _build(engine, seed=1)  # another run beside it: its rows must not count
    return _build(engine, seed=2)


@pytest.fixture(scope="module")
def one_param_run(engine) -> str:
    """A run whose every module has one parameter (their rows are not summed per step)."""
    return _build(engine, seed=3, params=[("embed.weight", 0), ("blocks.0.fc.weight", 1), ("scale", 2)])


@pytest.fixture(scope="module")
def two_param_run(engine) -> str:
    """A run whose every module has two parameters (all of them summed per step)."""
    params = [("embed.weight", 0), ("embed.bias", 1), ("head.weight", 2), ("head.bias", 3)]
    return _build(engine, seed=4, params=params)


def assert_same_map(new: HealthMap, old: HealthMap) -> None:
    assert new.steps == old.steps
    assert [p.stat for p in new.panels] == [p.stat for p in old.panels]
    for a, b in zip(new.panels, old.panels, strict=True):
        assert (a.rows, a.onsets) == (b.rows, b.onsets), a.stat
        if a.stat != "log10 grad_norm":
            assert a.values == b.values, a.stat
            continue
        # A module's squared norms at a step are summed in the database's order, not in the order Python read
        # the rows (which no query fixed either): the last bit may differ, nothing else.
        assert [[v is None for v in row] for row in a.values] == [[v is None for v in row] for row in b.values]
        for row_a, row_b in zip(a.values, b.values, strict=True):
            for x, y in zip(row_a, row_b, strict=True):
                assert x is None or x == pytest.approx(y, rel=1e-12, abs=0), (a.stat, row_a, row_b)


@pytest.mark.parametrize("columns", [1, 7, 200, 400, 401, 5000])
@pytest.mark.parametrize("rank", [0, 1, 2, 3, 4, 5])
def test_the_database_buckets_as_python_did(engine, awkward_run, rank, columns, monkeypatch):
    counted = []
    count = heatmap._count
    monkeypatch.setattr(heatmap, "_count", lambda *args: counted.append(args) or count(*args))
    new = pictures.health_map(engine, awkward_run, rank=rank, columns=columns)
    old = reference_health_map(engine, awkward_run, rank=rank, columns=columns)
    assert_same_map(new, old)
    if rank == 4:  # a run's usual steps, one a column or more: each table read once, its steps not counted
        assert not counted
    if rank == 0 and columns >= 200:  # scattered steps leave a column empty: counted
        assert counted
    if rank == 0 and columns == 200:  # the data is as awkward as meant: every kind of cell is there
        grads = new.panels[1]
        assert len(new.steps) == 200 and all(p.onsets for p in new.panels)
        assert grads.rows == ["embed", "blocks.0.fc", "scale", "head", "blocks.1.fc"]
        cells = [v for p in new.panels for row in p.values for v in row]
        assert None in cells and math.inf in cells and 0.0 in cells
        assert any(v is not None and v > 150 for row in grads.values for v in row)  # an overflowed square's


@pytest.mark.parametrize("columns", [1, 7, 200, 5000])
@pytest.mark.parametrize("rank", [0, 1, 4])
@pytest.mark.parametrize(("run", "modules"), [("one_param_run", 3), ("two_param_run", 2)])
def test_modules_of_one_size_as_python_did(engine, request, run, modules, rank, columns):
    run_id = request.getfixturevalue(run)
    new = pictures.health_map(engine, run_id, rank=rank, columns=columns)
    assert_same_map(new, reference_health_map(engine, run_id, rank=rank, columns=columns))
    assert len(new.panels[1].rows) == modules


def test_a_run_without_rows_has_an_empty_map(engine, awkward_run):
    empty = pictures.health_map(engine, awkward_run, rank=9)  # no rows on rank 9
    assert empty.steps == [] and [p.values for p in empty.panels] == [[], [], []]
    assert_same_map(empty, reference_health_map(engine, awkward_run, rank=9))
