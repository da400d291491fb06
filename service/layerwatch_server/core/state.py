"""What one collector process holds: settings, engine, ingestor, token cache, admission control."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter
from sqlalchemy import Engine

from layerwatch_server.core.config import Settings
from layerwatch_server.storage import tokens
from layerwatch_server.storage.ingest import Ingestor


class Overloaded(Exception):
    """More ingest requests in flight than configured; the client should back off (429)."""


class Admission:
    """A bounded count of in-flight ingests: beyond it, answer 429 at once instead of queueing memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0
        self.rejected = 0
        self._lock = threading.Lock()

    def __enter__(self) -> Admission:
        with self._lock:
            if self.inflight >= self.limit:
                self.rejected += 1
                raise Overloaded(f"{self.inflight} ingest requests in flight (limit {self.limit})")
            self.inflight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.inflight -= 1


class TokenCache:
    """Verified tokens (and unknown ones) remembered briefly, so ingest does not hit the DB per request."""

    def __init__(self, engine: Engine, ttl_s: float, size: int = 4096) -> None:
        self.engine, self.ttl_s, self.size = engine, ttl_s, size
        self._entries: OrderedDict[str, tuple[float, tokens.Grant | None]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, tokens.Grant | None]:
        """(True, grant) when a fresh answer is in memory; (False, None) when the DB must be asked."""
        with self._lock:
            hit = self._entries.get(tokens.hash_token(token))
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def resolve(self, token: str) -> tokens.Grant | None:
        found, grant = self.cached(token)
        if found:
            return grant
        key, now = tokens.hash_token(token), time.monotonic()
        grant = tokens.lookup(self.engine, token)
        with self._lock:
            self._entries[key] = (now + self.ttl_s, grant)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return grant


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
