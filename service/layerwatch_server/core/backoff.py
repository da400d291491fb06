"""How long the collector waits before trying again: one exponential backoff for its retry loops
(notification delivery, the mirror process's restarts, the MLflow mirror's failed ticks)."""

from __future__ import annotations

import random


def backoff_s(failures: int, *, first_s: float = 1.0, max_s: float = 60.0, jitter: float = 0.2) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``first_s``, doubled per further failure, at most
    ``max_s``, spread by +-``jitter`` so replicas retrying the same thing do not keep in step."""
    return min(max_s, first_s * 2.0 ** (failures - 1)) * random.uniform(1 - jitter, 1 + jitter)
