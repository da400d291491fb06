"""What one collector process holds: settings, engine, ingestor, token cache, admission control."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter
from sqlalchemy import Engine

from layerwatch_server.core.config import Settings
from layerwatch_server.core.state import Admission
from layerwatch_server.storage.ingest import Ingestor
from layerwatch_server.storage.tokens import TokenCache


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
    extras: dict[str, Any] = field(default_factory=dict)  # seams for later: rules, mirrors
