"""What one collector process holds (built by ``app.build_state``, read by the routes): settings, engine,
ingestor, token cache, admission control, the ranks' turns, alerting and its sender, telemetry, the MLflow mirror,
and the hooks run after each ingest and on the scheduler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter
from sqlalchemy import Engine

from layerwatch_server.api.order import Turns
from layerwatch_server.core.batch import Batch
from layerwatch_server.core.config import Settings
from layerwatch_server.core.state import Admission
from layerwatch_server.jobs.scheduler import Scheduler
from layerwatch_server.mirrors.mlflow_mirror import MlflowMirror
from layerwatch_server.mirrors.process import MirrorProcess
from layerwatch_server.notify.sender import Sender
from layerwatch_server.observability.telemetry import Telemetry
from layerwatch_server.rules.service import Alerting
from layerwatch_server.storage.ingest import Ingestor, IngestResult
from layerwatch_server.storage.ticks import JobFn
from layerwatch_server.storage.tokens import TokenCache

# After each batch's commit: the alerts it returns go into the 202 answer (telemetry returns none).
IngestHook = Callable[[Batch, IngestResult], list[dict[str, Any]]]


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    ingestor: Ingestor
    tokens: TokenCache
    admission: Admission
    heads: set[str]
    # Threads that may decode and write batches at once. SQLite has one writer, so more threads only
    # fight over the GIL. On PostgreSQL three (at most the pool's size): one waits on the database while
    # the others run Python; more only fight over the GIL while the ranks of a run queue on its row lock
    # (bench/ingest.py, 64 clients: ~27k layer-rows/s with 3 threads, ~20k with 8).
    ingest_limiter: CapacityLimiter
    telemetry: Telemetry
    alerting: Alerting
    sender: Sender  # delivers the alerts' notifications; started and stopped with the app
    # The in-process mirror until the lifespan starts the mirror's own process, then that process's handle:
    # either way its counters feed /metrics.
    mlflow_mirror: MlflowMirror | MirrorProcess | None
    ingest_hooks: list[IngestHook] = field(default_factory=list)
    rule_hooks: list[JobFn] = field(default_factory=list)  # the scheduler's "rules" job runs these
    scheduler: Scheduler | None = None
    turns: Turns = field(default_factory=Turns)  # each rank's batches written in its order (api.order)
