"""Per-process APScheduler whose jobs run at most once per tick across every replica.

Each replica has its own in-memory scheduler (a job store cannot be shared between processes); each tick
of a job goes through :func:`storage.ticks.run_once`, so one replica runs it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine

from layerwatch_server.storage.ticks import JobFn, replica_id, run_once

log = logging.getLogger("layerwatch_server.jobs")


class Scheduler:
    """The jobs of one process. ``add`` before ``start``; ``shutdown`` waits for a running job."""

    def __init__(self, engine: Engine, *, replica: str | None = None) -> None:
        self.engine = engine
        self.replica = replica or replica_id()
        self._sched = BackgroundScheduler(
            timezone=dt.timezone.utc,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )

    def add(self, job: str, interval_s: float, fn: JobFn) -> None:
        # Aligned to the epoch so every replica fires at the same instants (one tick, one winner).
        start = dt.datetime.fromtimestamp((time.time() // interval_s + 1) * interval_s, dt.timezone.utc)
        self._sched.add_job(
            self._guarded,
            "interval",
            seconds=interval_s,
            start_date=start,
            id=job,
            name=job,
            args=(job, interval_s, fn),
        )

    def _guarded(self, job: str, interval_s: float, fn: JobFn) -> None:
        try:
            run_once(self.engine, job, interval_s, fn, replica=self.replica)
        except Exception:  # a failing job must not kill the scheduler; the next tick tries again
            log.exception("job %s failed", job)

    def start(self) -> None:
        self._sched.start()

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)
