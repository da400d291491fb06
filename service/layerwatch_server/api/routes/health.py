"""Liveness and readiness."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from layerwatch_server.api.deps import StateDep
from layerwatch_server.api.state import AppState
from layerwatch_server.storage.migrations import current_revisions
from layerwatch_server.storage.ticks import replica_id

router = APIRouter(tags=["health"])
_REPLICA = replica_id()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


_NOT_READY = {"description": "The database cannot take writes, or its schema is not at head"}


@router.get("/readyz", responses={503: _NOT_READY})
def readyz(state: StateDep) -> JSONResponse:
    """The database answers, its schema is at the Alembic head this server was built for, and it takes writes:
    a small write is committed (a database that only reads, a read-only replica after a fail-over, is not
    ready), and on SQLite the database's disk has ``min_free_mb`` free (a full disk can still take the probe's
    few bytes while every batch fails)."""
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = current_revisions(state.engine)
    except Exception as exc:  # any failure to reach the DB means "not ready", never a 500
        return _unavailable(state, f"database: {type(exc).__name__}")
    if current != state.heads:
        return _unavailable(
            state, f"schema at {sorted(current)}, need {sorted(state.heads)}: run `layerwatch-server migrate`"
        )
    free_mb = _sqlite_free_mb(state)
    if free_mb is not None and free_mb < state.settings.min_free_mb:
        return _unavailable(
            state, f"database disk has {free_mb:.1f} MiB free, less than min_free_mb ({state.settings.min_free_mb:g})"
        )
    try:
        state.ingestor.probe(_REPLICA)
    except Exception as exc:
        cause = getattr(exc, "orig", None) or exc  # the driver's error, under SQLAlchemy's
        first = (str(cause).splitlines() or [""])[0]
        return _unavailable(state, f"database cannot take writes ({type(cause).__name__}: {first})")
    return JSONResponse({"status": "ready", "schema": sorted(current)})


def _unavailable(state: AppState, detail: str) -> JSONResponse:
    return JSONResponse(
        {"status": "unavailable", "detail": detail}, 503, headers={"Retry-After": str(state.settings.retry_after_s)}
    )


def _sqlite_free_mb(state: AppState) -> float | None:
    """Free space where the SQLite database file lives; None for another database or one in memory."""
    url = state.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    try:
        return shutil.disk_usage(Path(url.database).resolve().parent).free / 2**20
    except OSError:
        return None
