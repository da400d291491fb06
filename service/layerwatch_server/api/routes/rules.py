"""Rules as data: ``GET/POST/PUT/DELETE /api/v1/rules`` (admin token). API rules override the rules file."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException
from sqlalchemy import delete, select

from layerwatch_server.api.deps import GrantDep, StateDep
from layerwatch_server.api.schemas import Problem
from layerwatch_server.rules.service import Alerting
from layerwatch_server.rules.spec import BUILTINS, RuleError, parse_rule
from layerwatch_server.storage.base import finite_json, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import RuleDef

router = APIRouter(
    tags=["rules"], responses={401: {"model": Problem}, 403: {"model": Problem}, 422: {"model": Problem}}
)


def _admin(grant: Any) -> None:
    if grant is not None and (grant.scope != "admin" or grant.project != "*"):
        raise HTTPException(403, "rules need an admin token of all projects (--project '*' --scope admin)")


def _alerting(state: Any) -> Alerting:
    return state.alerting


@router.get("/rules")
def list_rules(state: StateDep, grant: GrantDep, project: str | None = None) -> Any:
    """Effective global rules (or a project's), built-ins included, with where each override comes from."""
    _admin(grant)
    al = _alerting(state)
    al.invalidate()
    levels = [al.cfg.rules, al.db_rules(), al.cfg.projects.get(project or "", {})]
    names = sorted({*BUILTINS, *(n for lvl in levels for n in lvl)})
    out = []
    for name in names:
        fields: dict[str, Any] = {}
        for lvl in levels:
            fields.update(lvl.get(name, {}))
        try:
            rule = parse_rule(name, fields)
        except RuleError as exc:
            out.append({"name": name, "error": str(exc)})
            continue
        src = "api" if name in levels[1] else "file" if name in levels[0] else "builtin"
        out.append({**rule.model_dump(by_alias=True, exclude_none=True), "source": src})
    return finite_json(out)


def _save(state: Any, name: str, spec: dict[str, Any], *, create: bool) -> dict[str, Any]:
    spec = {k: v for k, v in spec.items() if k != "name"}
    try:
        rule = parse_rule(name, spec)
    except RuleError as exc:
        raise HTTPException(422, str(exc)) from None
    with writer(state.engine).begin() as conn:
        exists = conn.scalar(select(RuleDef.name).where(RuleDef.name == name)) is not None
        if create and exists:
            raise HTTPException(409, f"rule {name!r} exists; PUT /api/v1/rules/{name} to change it")
        if exists:
            conn.execute(RuleDef.__table__.update().where(RuleDef.name == name).values(spec=spec, updated_at=utcnow()))
        else:
            conn.execute(RuleDef.__table__.insert().values(name=name, spec=spec, updated_at=utcnow()))
    _alerting(state).invalidate()
    return {**rule.model_dump(by_alias=True, exclude_none=True), "source": "api"}


@router.post("/rules", status_code=201)
def create_rule(state: StateDep, grant: GrantDep, body: Annotated[dict[str, Any], Body()]) -> Any:
    """A new rule (or an override of a built-in): ``{"name", "stat", "op", "threshold", "for", ...}``."""
    _admin(grant)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise HTTPException(422, "name: a rule needs a name")
    return finite_json(_save(state, name, body, create=True))


@router.put("/rules/{name}")
def put_rule(state: StateDep, grant: GrantDep, name: str, body: Annotated[dict[str, Any], Body()]) -> Any:
    _admin(grant)
    return finite_json(_save(state, name, body, create=False))


@router.delete("/rules/{name}", status_code=204)
def delete_rule(state: StateDep, grant: GrantDep, name: str) -> None:
    """Drop the API definition; a built-in or file rule of that name falls back to its defaults."""
    _admin(grant)
    with writer(state.engine).begin() as conn:
        gone = conn.execute(delete(RuleDef).where(RuleDef.name == name)).rowcount
    if not gone:
        raise HTTPException(404, f"no API rule {name!r}")
    _alerting(state).invalidate()
