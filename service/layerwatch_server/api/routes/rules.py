"""Rules as data: ``GET/POST/PUT/DELETE /api/v1/rules`` (admin token). API rules override the rules file.

The bodies are validated by the rules themselves (``rules.spec.parse_rule``: a 422 names the field); the
OpenAPI schema of a body is the rule's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException
from pydantic import WithJsonSchema

from layerwatch_server.api.deps import GrantDep, StateDep
from layerwatch_server.api.schemas import Problem
from layerwatch_server.rules.book import RuleBook, RuleExists
from layerwatch_server.rules.spec import Rule, RuleError
from layerwatch_server.storage.base import finite_json
from layerwatch_server.storage.tokens import Grant

router = APIRouter(
    tags=["rules"], responses={401: {"model": Problem}, 403: {"model": Problem}, 422: {"model": Problem}}
)


def _rule_schema(*, named: bool) -> dict[str, Any]:
    schema = Rule.model_json_schema(by_alias=True)
    schema["title"] = "RuleIn" if named else "RuleChange"
    if not named:  # PUT names the rule in its path
        schema["required"] = [f for f in schema.get("required", []) if f != "name"]
    schema["additionalProperties"] = False
    return schema


# A JSON object read as is (so a bad field gets parse_rule's 422 naming it), documented as a rule.
RuleIn = Annotated[dict[str, Any], WithJsonSchema(_rule_schema(named=True)), Body(title="RuleIn")]
RuleChange = Annotated[dict[str, Any], WithJsonSchema(_rule_schema(named=False)), Body(title="RuleChange")]


def _admin(grant: Grant | None) -> None:
    if grant is not None and (grant.scope != "admin" or grant.project != "*"):
        raise HTTPException(403, "rules need an admin token of all projects (--project '*' --scope admin)")


@router.get("/rules")
def list_rules(state: StateDep, grant: GrantDep, project: str | None = None) -> Any:
    """Effective global rules (or a project's), built-ins included, with where each override comes from."""
    _admin(grant)
    return finite_json(state.alerting.book.listing(project))


def _save(book: RuleBook, name: str, spec: dict[str, Any], *, create: bool) -> dict[str, Any]:
    try:
        rule = book.save(name, spec, create=create)
    except RuleExists as exc:
        raise HTTPException(409, str(exc)) from None
    except RuleError as exc:
        raise HTTPException(422, str(exc)) from None
    return finite_json({**rule.model_dump(by_alias=True, exclude_none=True), "source": "api"})


@router.post("/rules", status_code=201)
def create_rule(state: StateDep, grant: GrantDep, body: RuleIn) -> Any:
    """A new rule (or an override of a built-in): ``{"name", "stat", "op", "threshold", "for", ...}``."""
    _admin(grant)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise HTTPException(422, "name: a rule needs a name")
    return _save(state.alerting.book, name, body, create=True)


@router.put("/rules/{name}")
def put_rule(state: StateDep, grant: GrantDep, name: str, body: RuleChange) -> Any:
    _admin(grant)
    return _save(state.alerting.book, name, body, create=False)


@router.delete("/rules/{name}", status_code=204)
def delete_rule(state: StateDep, grant: GrantDep, name: str) -> None:
    """Drop the API definition; a built-in or file rule of that name falls back to its defaults."""
    _admin(grant)
    if not state.alerting.book.drop(name):
        raise HTTPException(404, f"no API rule {name!r}")
