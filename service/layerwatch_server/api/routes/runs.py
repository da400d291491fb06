"""Read API: projects, runs, one run, one series. Needs a read (or admin) token of the project."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import JSONResponse

from layerwatch_server import pictures
from layerwatch_server.api.deps import GrantDep, StateDep, authorize, covered_projects, readable_projects
from layerwatch_server.api.schemas import Problem, ProjectOut, RunDetail, RunOut, Series
from layerwatch_server.api.state import AppState
from layerwatch_server.core.layers import dead_judged
from layerwatch_server.storage import histograms, queries
from layerwatch_server.storage.base import finite_json
from layerwatch_server.storage.models import RUN_STATUSES
from layerwatch_server.storage.tokens import Grant

router = APIRouter(tags=["query"], responses={401: {"model": Problem}, 403: {"model": Problem}})


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(state: StateDep, grant: GrantDep) -> Any:
    _can_read_something(grant)
    return queries.list_projects(state.engine, readable_projects(grant))


@router.get("/runs", response_model=list[RunOut])
def list_runs(
    state: StateDep,
    grant: GrantDep,
    project: Annotated[str | None, Query(max_length=100)] = None,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(RUN_STATUSES) + ")$")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    if project is not None:
        authorize(grant, project, "read")
    _can_read_something(grant)
    return queries.list_runs(state.engine, project=project, status=status, only=readable_projects(grant), limit=limit)


def _can_read_something(grant: Grant | None) -> None:
    """403 for a token that can read no project (a job's write token): an empty list would say "no runs"."""
    if grant is not None and readable_projects(grant) == set():
        raise HTTPException(
            403,
            f"this token ({grant.scope} on project {grant.project!r}) cannot read: listing and reading runs needs a "
            "read or admin token (layerwatch-server token create --project P --scope read)",
        )


# A run named by its id or, as git names a commit, by a prefix of it that only this run's id has.
RunRef = Annotated[str, Path(description="The run's id, or a prefix of it (4 characters or more) that is unique.")]


def _readable_run(state: AppState, grant: Grant | None, ref: str) -> str:
    """The full id of the run ``ref`` names (an id or its unique start) that ``grant`` may read; other projects'
    runs answer 404 like unknown ones."""
    run_id = queries.resolve_run_id(state.engine, ref, covered_projects(grant))
    authorize(grant, queries.run_project(state.engine, run_id), "read")
    return run_id


@router.get("/runs/{run_id}", response_model=RunDetail, responses={404: {"model": Problem}, 422: {"model": Problem}})
def get_run(state: StateDep, grant: GrantDep, run_id: RunRef) -> Any:
    run_id = _readable_run(state, grant, run_id)
    return JSONResponse(
        finite_json(RunDetail.model_validate(queries.get_run(state.engine, run_id)).model_dump(mode="json"))
    )


@router.get(
    "/runs/{run_id}/series",
    response_model=Series,
    responses={404: {"model": Problem}},
    description="One statistic over steps. `stat` is a layer statistic (with `layer`), a parameter "
    "statistic (`layer` = parameter name), or a step statistic (`loss`, `lr`, `grad_norm_total`, or a "
    "user scalar; no `layer`). With `max_points`, each bucket of steps keeps its minimum and maximum "
    "(NaN ranks above +Infinity, so a NaN is always kept). Non-finite values are the strings "
    '"NaN", "Infinity", "-Infinity". Rolled-up (retention) buckets carry `min`/`max` and `value` = mean.',
)
def get_series(
    state: StateDep,
    grant: GrantDep,
    run_id: RunRef,
    stat: Annotated[str, Query(min_length=1, max_length=200)],
    layer: Annotated[str | None, Query(max_length=500)] = None,
    start: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    end: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    max_points: Annotated[int | None, Query(ge=2, le=100_000)] = None,
    rank: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Any:
    run_id = _readable_run(state, grant, run_id)
    points = queries.series(
        state.engine, run_id, layer=layer, stat=stat, rank=rank, start=start, end=end, max_points=max_points
    )
    return JSONResponse({"run_id": run_id, "layer": layer, "stat": stat, "rank": rank, "points": finite_json(points)})


@router.get(
    "/runs/{run_id}/histograms",
    responses={404: {"model": Problem}, 422: {"model": Problem}},
    description="A layer's histograms over steps: its activations (`kind=activation`) or the gradients of the "
    "parameters its module owns (`kind=gradient`), measured at the last step of each report. `counts[i]` holds "
    "the counts at `steps[i]` in the `len(edges) + 1` bins between `edges` (a bin is closed on the side nearer "
    "zero; see layerwatch.histograms), summed over ranks; `nan[i]` the NaNs, counted apart. With `max_points`, "
    "consecutive histograms are summed in at most that many buckets, each named by its last step, `merged[i]` "
    "of them in bucket i (a sum, like the series' min/max, hides nothing that happened in a bucket).",
)
def get_histograms(
    state: StateDep,
    grant: GrantDep,
    run_id: RunRef,
    layer: Annotated[str, Query(min_length=1, max_length=500)],
    kind: Annotated[str, Query(pattern="^(activation|gradient)$")] = "activation",
    start: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    end: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    max_points: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> Any:
    run_id = _readable_run(state, grant, run_id)
    found = histograms.read(state.engine, run_id, layer=layer, kind=kind, start=start, end=end, max_points=max_points)
    return JSONResponse({"run_id": run_id, "layer": layer, "kind": kind, **found})


@router.get(
    "/runs/{run_id}/health_map",
    responses={404: {"model": Problem}},
    description="The run's health map as numbers (what `layerwatch show RUN --map` draws): per panel "
    "(`dead_frac`, `log10 grad_norm` per parameter-owning module, `sat_frac`) its rows in model order and "
    "`values[row][column]`, the worst value of each column's steps (null: nothing measured); `steps` names "
    "each column by its last step; `onsets`: [row, column] of each alert's onset.",
)
def get_health_map(
    state: StateDep,
    grant: GrantDep,
    run_id: RunRef,
    columns: Annotated[int, Query(ge=1, le=2000)] = 200,
    rank: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> Any:
    run_id = _readable_run(state, grant, run_id)
    data = pictures.health_map(state.engine, run_id, rank=rank, columns=columns)
    return JSONResponse(finite_json({"run_id": run_id, **dataclasses.asdict(data)}))


@router.get(
    "/runs/{run_id}/latest",
    responses={404: {"model": Problem}},
    description="Each layer's most recent value of every layer statistic within the last `lookback` steps "
    "(what `layerwatch tail` shows), with `index` (execution order) and `dead_judged`: whether its `dead_frac` "
    "means dead units, as the `dead_units` rule reads it (not for an output head, nor for a Linear/Conv whose "
    'units the activation after it reports). Non-finite values are the strings "NaN", "Infinity", "-Infinity".',
)
def get_latest(
    state: StateDep,
    grant: GrantDep,
    run_id: RunRef,
    rank: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    lookback: Annotated[int, Query(ge=1, le=100_000)] = 200,
) -> Any:
    run_id = _readable_run(state, grant, run_id)
    out = queries.latest(state.engine, run_id, rank=rank, lookback=lookback)
    judged = dead_judged((layer["index"], layer["name"], layer["type"]) for layer in out["layers"])
    for layer in out["layers"]:
        layer["dead_judged"] = layer["name"] in judged
    return JSONResponse(finite_json(out))
