"""Alerts and silences: list alerts with their evidence, one alert with its delivery attempts, silences.

Silences belong to projects: a project admin's silence covers its own project (or one of its runs), and only
an all-projects admin may mute every project. Anything of a project the caller cannot see answers as unknown.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import false, or_, select, update
from sqlalchemy.orm import Session

from layerwatch_server.api.deps import GrantDep, StateDep, authorize, authorize_resource, readable_projects
from layerwatch_server.api.schemas import Problem
from layerwatch_server.api.state import AppState
from layerwatch_server.notify.outbox import attempts_for
from layerwatch_server.storage import queries
from layerwatch_server.storage.alerts import alert_dict
from layerwatch_server.storage.base import finite_json, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import ALL_PROJECTS, AlertRow, Silence
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
    q = select(AlertRow).order_by(AlertRow.updated_at.desc()).limit(limit)
    if project is not None:
        q = q.where(AlertRow.project == project)
    if run_id is not None:
        q = q.where(AlertRow.run_id == run_id)
    if state_ is not None:
        q = q.where(AlertRow.state == state_)
    only = readable_projects(grant)
    if only is not None:
        q = q.where(AlertRow.project.in_(only))
    with Session(state.engine) as s:
        rows = s.scalars(q).all()
    return JSONResponse(finite_json([alert_dict(a) for a in rows]))


@router.get("/alerts/{alert_id}", responses={404: {"model": Problem}})
def get_alert(state: StateDep, grant: GrantDep, alert_id: str) -> Any:
    """One alert, with its notifications and every delivery attempt."""
    with Session(state.engine) as s:
        row = s.get(AlertRow, alert_id)
        unknown = HTTPException(404, f"no alert {alert_id!r}")
        if row is None:
            raise unknown
        authorize_resource(grant, row.project, "read", unknown)
        out = {**alert_dict(row), "evidence": row.evidence, "notifications": attempts_for(s, alert_id)}
    return JSONResponse(finite_json(out))


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
    now = utcnow()
    row = Silence(
        id=secrets.token_hex(6),
        starts_at=now,
        ends_at=now + dt.timedelta(seconds=body.duration_s),
        **{**body.model_dump(exclude={"duration_s"}), "project": project},
    )
    with writer(state.engine).begin() as conn:
        conn.execute(Silence.__table__.insert().values(**{c.name: getattr(row, c.name) for c in Silence.__table__.c}))
    return _silence_dict(row)


@router.get("/silences")
def list_silences(state: StateDep, grant: GrantDep) -> Any:
    """Silences in force over the projects this token may read, those of every project included."""
    q = select(Silence).where(Silence.ends_at > utcnow()).order_by(Silence.ends_at)
    only = readable_projects(grant)
    if only is not None:
        q = q.where(or_(Silence.project.in_(only), Silence.project.is_(None))) if only else q.where(false())
    with Session(state.engine) as session:
        rows = session.scalars(q).all()
    return [_silence_dict(s) for s in rows]


@router.delete("/silences/{silence_id}", status_code=204, responses={404: {"model": Problem}})
def end_silence(state: StateDep, grant: GrantDep, silence_id: Annotated[str, Path(max_length=16)]) -> None:
    """End a silence now (it stays listed nowhere: only silences in force are)."""
    if grant is not None and grant.scope != "admin":
        raise HTTPException(403, "silences need an admin token")
    unknown = HTTPException(404, f"no silence {silence_id!r}")
    now = utcnow()
    with writer(state.engine).begin() as conn:
        row = conn.execute(select(Silence.project).where(Silence.id == silence_id, Silence.ends_at > now)).first()
        if row is None:
            raise unknown
        authorize_resource(grant, row.project, "write", unknown)
        conn.execute(update(Silence).where(Silence.id == silence_id).values(ends_at=now))


def _silence_dict(s: Silence) -> dict[str, Any]:
    return {
        "id": s.id,
        "project": s.project,
        "run_id": s.run_id,
        "rule": s.rule,
        "layer": s.layer,
        "comment": s.comment,
        "starts_at": s.starts_at.isoformat(),
        "ends_at": s.ends_at.isoformat(),
    }
