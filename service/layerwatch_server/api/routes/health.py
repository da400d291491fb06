"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from layerwatch_server.api.deps import StateDep
from layerwatch_server.storage.migrations import current_revisions

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "DB unreachable or schema not at head"}})
def readyz(state: StateDep) -> JSONResponse:
    """The database answers and its schema is at the Alembic head this server was built for."""
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = current_revisions(state.engine)
    except Exception as exc:  # any failure to reach the DB means "not ready", never a 500
        return JSONResponse(
            {"status": "unavailable", "detail": f"database: {type(exc).__name__}"},
            503,
            headers={"Retry-After": str(state.settings.retry_after_s)},
        )
    if current != state.heads:
        return JSONResponse(
            {
                "status": "unavailable",
                "detail": f"schema at {sorted(current)}, need {sorted(state.heads)}: run `layerwatch-server migrate`",
            },
            503,
        )
    return JSONResponse({"status": "ready", "schema": sorted(current)})
