"""Admission control: how many ingests one collector process takes at once."""

from __future__ import annotations

import threading


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
