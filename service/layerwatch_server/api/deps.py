"""Request dependencies: the process state and the caller's grant (None when auth is off)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from layerwatch_server.api.state import AppState
from layerwatch_server.storage.models import ALL_PROJECTS
from layerwatch_server.storage.tokens import Grant

_bearer = HTTPBearer(auto_error=False, description="A token from `layerwatch-server token create`.")


# Dependencies are async on purpose: FastAPI runs a plain ``def`` dependency in the threadpool, one
# thread hop per request for what is a dictionary lookup.
async def get_state(request: Request) -> AppState:
    return request.app.state.lw


StateDep = Annotated[AppState, Depends(get_state)]


async def get_grant(
    state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Grant | None:
    if state.settings.no_auth:
        return None
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "missing token: send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"}
        )
    found, grant = state.tokens.cached(credentials.credentials)
    if not found:  # a DB lookup: keep it off the event loop
        grant = await run_in_threadpool(state.tokens.resolve, credentials.credentials)
    if grant is None:
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return grant


GrantDep = Annotated[Grant | None, Depends(get_grant)]


def authorize(grant: Grant | None, project: str, need: str) -> None:
    """403 unless the grant covers ``need`` ("write" or "read") on ``project``."""
    if grant is not None and not grant.allows(project, need):
        raise HTTPException(
            403, f"this token ({grant.scope} on project {grant.project!r}) cannot {need} project {project!r}"
        )


def authorize_resource(grant: Grant | None, project: str | None, need: str, unknown: Exception) -> None:
    """:func:`authorize` for something addressed by its id. One of a project the grant does not cover raises
    ``unknown``, the very error an unknown id gets (a 404), so no answer tells which ids exist elsewhere.
    ``project`` None: a resource of every project, which only an all-projects grant may touch (403)."""
    if grant is None:
        return
    if project is None:
        if grant.project != ALL_PROJECTS or not grant.allows(ALL_PROJECTS, need):
            raise HTTPException(403, "this belongs to every project: it needs an admin token of all projects")
        return
    if grant.project not in (project, ALL_PROJECTS):
        raise unknown
    authorize(grant, project, need)


def covered_projects(grant: Grant | None) -> set[str] | None:
    """Projects whose resources a grant may learn exist, whatever its scope; None means all."""
    if grant is None or grant.project == ALL_PROJECTS:
        return None
    return {grant.project}


def readable_projects(grant: Grant | None) -> set[str] | None:
    """Projects a grant may list; None means all."""
    if grant is None or grant.project == "*":
        return None
    return {grant.project} if grant.scope in ("read", "admin") else set()
