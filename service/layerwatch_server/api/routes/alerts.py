"""Alerts and silences: list alerts with their evidence, one alert with its delivery attempts, silences.

Silences belong to projects: a project admin's silence covers its own project (or one of its runs), and only
an all-projects admin may mute every project. Anything of a project the caller cannot see answers as unknown.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from layerwatch_server.api.deps import GrantDep, StateDep, authorize, authorize_resource, readable_projects
from layerwatch_server.api.schemas import Problem
from layerwatch_server.api.state import AppState
from layerwatch_server.notify.outbox import attempts_for
from layerwatch_server.storage import alerts, queries, silences
from layerwatch_server.storage.base import finite_json
from layerwatch_server.storage.models import ALL_PROJECTS
from layerwatch_server.storage.tokens import Grant

router = APIRouter(tags=["alerts"], responses={401: {"model": Problem}, 403: {"model": Problem}})


@router.get("/alerts")
def list_alerts(
    state: StateDep,
    grant: GrantDep,
    project: Annotated[str | None, Query(max_length=100)] = None,
    run_id: Annotated[str | None, Query(max_length=16)] = None,
    state_: Annotated[str | None, Query(alias="state", pattern="^(pending|firing|resolved)$")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Alerts, newest first, each with its evidence (step, value, threshold, message)."""
    if project is not None:
        authorize(grant, project, "read")
    rows = alerts.list_alerts(
        state.engine, project=project, run_id=run_id, state=state_, only=readable_projects(grant), limit=limit
    )
    return JSONResponse(finite_json(rows))


@router.get("/alerts/{alert_id}", responses={404: {"model": Problem}})
def get_alert(state: StateDep, grant: GrantDep, alert_id: str) -> Any:
    """One alert, with its notifications and every delivery attempt."""
    alert = alerts.get_alert(state.engine, alert_id)
    unknown = HTTPException(404, f"no alert {alert_id!r}")
    if alert is None:
        raise unknown
    authorize_resource(grant, alert["project"], "read", unknown)
    return JSONResponse(finite_json({**alert, "notifications": attempts_for(state.engine, alert_id)}))


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str | None = Field(
        None, max_length=100, description="Default: the token's project (every project for an all-projects token)."
    )
    run_id: str | None = Field(None, max_length=16, description="One run (its project is the silence's).")
    rule: str | None = Field(None, max_length=100)
    layer: str | None = Field(None, max_length=500, description="fnmatch pattern on the layer name")
    duration_s: float = Field(gt=0, le=365 * 86400)
    comment: str = Field("", max_length=1000)


def _silence_project(state: AppState, grant: Grant | None, body: SilenceIn) -> str | None:
    """The project a new silence covers; None (every project) only for an all-projects token or without auth."""
    project = body.project
    if body.run_id is not None:  # an unknown run, and one of a project the token does not cover: the same 404
        run_project = queries.run_project(state.engine, body.run_id)
        authorize_resource(grant, run_project, "write", queries.NotFound(f"run {body.run_id!r} not found"))
        if project not in (None, run_project):
            raise HTTPException(422, f"run {body.run_id!r} is not in project {project!r}")
        return run_project
    if project is None and grant is not None and grant.project != ALL_PROJECTS:
        project = grant.project  # a project admin mutes its own project, never every project
    if project is not None:
        authorize(grant, project, "write")
    return project


@router.post("/silences", status_code=201, responses={404: {"model": Problem}, 422: {"model": Problem}})
def create_silence(state: StateDep, grant: GrantDep, body: SilenceIn) -> Any:
    """Mute notifications (alerts are still recorded) for matching run/rule/layer for a while."""
    if grant is not None and grant.scope != "admin":
        raise HTTPException(403, "silences need an admin token")
    project = _silence_project(state, grant, body)
    return silences.create(state.engine, **{**body.model_dump(), "project": project})


@router.get("/silences")
def list_silences(state: StateDep, grant: GrantDep) -> Any:
    """Silences in force over the projects this token may read, those of every project included."""
    return silences.in_force(state.engine, readable_projects(grant))


@router.delete("/silences/{silence_id}", status_code=204, responses={404: {"model": Problem}})
def end_silence(state: StateDep, grant: GrantDep, silence_id: Annotated[str, Path(max_length=16)]) -> None:
    """End a silence now (it stays listed nowhere: only silences in force are)."""
    if grant is not None and grant.scope != "admin":
        raise HTTPException(403, "silences need an admin token")
    unknown = HTTPException(404, f"no silence {silence_id!r}")
    found, project = silences.project_in_force(state.engine, silence_id)
    if not found:
        raise unknown
    authorize_resource(grant, project, "write", unknown)
    if not silences.end(state.engine, silence_id):
        raise unknown  # it ended meanwhile
