"""Alerts and silences: list alerts with their evidence, one alert with its delivery attempts, silences."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from layerwatch_server.api.deps import GrantDep, StateDep, authorize, readable_projects
from layerwatch_server.api.schemas import Problem
from layerwatch_server.notify.outbox import attempts_for
from layerwatch_server.rules.lifecycle import alert_dict
from layerwatch_server.storage.base import finite_json, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import AlertRow, Silence

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
        if row is None:
            raise HTTPException(404, f"no alert {alert_id!r}")
        authorize(grant, row.project, "read")
        out = {**alert_dict(row), "evidence": row.evidence, "notifications": attempts_for(s, alert_id)}
    return JSONResponse(finite_json(out))


class SilenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str | None = Field(None, max_length=100)
    run_id: str | None = Field(None, max_length=16)
    rule: str | None = Field(None, max_length=100)
    layer: str | None = Field(None, max_length=500, description="fnmatch pattern on the layer name")
    duration_s: float = Field(gt=0, le=365 * 86400)
    comment: str = Field("", max_length=1000)


@router.post("/silences", status_code=201)
def create_silence(state: StateDep, grant: GrantDep, body: SilenceIn) -> Any:
    """Mute notifications (alerts are still recorded) for matching run/rule/layer for a while."""
    if grant is not None and grant.scope != "admin":
        raise HTTPException(403, "silences need an admin token")
    if body.project is not None:
        authorize(grant, body.project, "write")
    now = utcnow()
    fields = body.model_dump(exclude={"duration_s"})
    row = Silence(id=secrets.token_hex(6), starts_at=now, ends_at=now + dt.timedelta(seconds=body.duration_s), **fields)
    with writer(state.engine).begin() as conn:
        conn.execute(
            Silence.__table__.insert().values(**{c: getattr(row, c) for c in (*fields, "id", "starts_at", "ends_at")})
        )
    return {"id": row.id, **fields, "starts_at": now.isoformat(), "ends_at": row.ends_at.isoformat()}


@router.get("/silences")
def list_silences(state: StateDep, grant: GrantDep) -> Any:
    with Session(state.engine) as session:
        rows = session.scalars(select(Silence).where(Silence.ends_at > utcnow())).all()
    return [
        {
            "id": s.id,
            "project": s.project,
            "run_id": s.run_id,
            "rule": s.rule,
            "layer": s.layer,
            "comment": s.comment,
            "starts_at": s.starts_at.isoformat(),
            "ends_at": s.ends_at.isoformat(),
        }
        for s in rows
    ]
