"""The FastAPI application: ``create_app(settings)`` wires state, routes, errors and the scheduler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import CapacityLimiter
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy import Engine

from layerwatch_server.api import errors
from layerwatch_server.api.alerting import load_alerting, make_alerting
from layerwatch_server.api.routes import alerts, health, ingest, metrics, rules, runs
from layerwatch_server.api.state import AppState
from layerwatch_server.core.batch import Batch
from layerwatch_server.core.config import Settings
from layerwatch_server.core.state import Admission
from layerwatch_server.jobs.hooks import run_hooks
from layerwatch_server.jobs.retention import retention_job
from layerwatch_server.jobs.scheduler import Scheduler
from layerwatch_server.mirrors import mlflow_mirror
from layerwatch_server.mirrors import process as mirror_process
from layerwatch_server.notify.sender import Sender
from layerwatch_server.observability.telemetry import MetricsMiddleware, Telemetry
from layerwatch_server.storage.engine import Checkpointer, make_engine
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.migrations import head_revisions
from layerwatch_server.storage.tokens import TokenCache

log = logging.getLogger("layerwatch_server")


def build_state(settings: Settings, engine: Engine | None = None) -> AppState:
    """``engine`` None: the state's own, and on SQLite :func:`create_app` runs its WAL checkpoints (a
    :class:`Checkpointer`), so ingest commits never copy the WAL into the database file themselves."""
    engine = engine or make_engine(
        settings.db_url, timeout_s=settings.db_timeout_s, pool_size=settings.pool_size, background_checkpoint=True
    )
    telemetry = Telemetry.from_settings(settings)
    ingestor = Ingestor(engine, lock_timeout_s=settings.db_timeout_s)
    alerting_cfg = load_alerting(settings.rules_file)
    sender = Sender(engine, lambda: alerting_cfg)
    alerting = make_alerting(engine, alerting_cfg, sender=sender)
    alerting.attach(ingestor)  # evaluated inside each batch's transaction; on_ingest finishes after it
    alerting.listeners.append(telemetry.snapshot.set_alerts)
    state = AppState(
        settings=settings,
        engine=engine,
        ingestor=ingestor,
        tokens=TokenCache(engine, settings.token_cache_s),
        admission=Admission(settings.max_inflight),
        heads=head_revisions(settings.db_url),
        ingest_limiter=CapacityLimiter(2 if engine.dialect.name == "sqlite" else min(3, settings.pool_size)),
        telemetry=telemetry,
        alerting=alerting,
        sender=sender,
        mlflow_mirror=mlflow_mirror.from_settings(settings),
        ingest_hooks=[telemetry.ingest_hook, alerting.on_ingest],
        rule_hooks=[alerting.tick],
    )
    telemetry.watch(state)
    return state


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    state = build_state(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.no_auth:
            log.warning(
                "AUTH IS DISABLED (--no-auth): anyone who can reach %s:%s can read and write every project",
                settings.host,
                settings.port,
            )
        scheduler = checkpointer = mirror = None
        if state.engine.dialect.name == "sqlite" and engine is None:
            checkpointer = Checkpointer(state.engine)
            checkpointer.start()
        state.sender.start()
        if settings.scheduler:
            scheduler = Scheduler(state.engine)
            scheduler.add(
                "retention",
                settings.retention_interval_s,
                retention_job(settings.retention_days, settings.rollup_bucket_steps),
            )
            scheduler.add("rules", settings.job_interval_s, run_hooks(state.rule_hooks))
            scheduler.start()
            state.scheduler = scheduler
            job = mirror_process.job_from_settings(settings)
            if job is not None:  # its own process: the mirror's ticks never take ingest's CPU
                mirror = mirror_process.MirrorProcess(job)
                mirror.start()
                state.mlflow_mirror = mirror  # its counters feed /metrics
        try:
            yield
        finally:  # uvicorn has drained in-flight requests (and their transactions) by now
            if scheduler is not None:
                scheduler.shutdown()
            if mirror is not None:
                mirror.stop()
            state.sender.stop()
            if checkpointer is not None:
                checkpointer.stop()
            if engine is None:
                state.engine.dispose()

    app = FastAPI(
        title="layerwatch collector",
        version="1",
        summary="Receives per-layer training statistics and serves them back.",
        lifespan=lifespan,
    )
    app.state.lw = state
    errors.install(app, settings.retry_after_s)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.add_middleware(MetricsMiddleware, telemetry=state.telemetry)
    app.include_router(ingest.router, prefix="/api/v1")
    app.include_router(runs.router, prefix="/api/v1")
    app.include_router(alerts.router, prefix="/api/v1")
    app.include_router(rules.router, prefix="/api/v1")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated spec plus the wire ``Batch`` schema that the ingest body refers to."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        batch = Batch.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(batch.pop("$defs", {}))
        schemas["Batch"] = batch
        app.openapi_schema = spec
    return app.openapi_schema
