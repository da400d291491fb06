"""One run of a job per tick across every replica: a lease row per (job, tick) in ``job_ticks``.

A tick is ``floor(now / interval)``; the replica that first inserts the lease row (job, tick) runs it, the
others skip. On PostgreSQL a session advisory lock also keeps one job from overlapping itself when a
run lasts longer than its interval. Used by the scheduler's jobs and by the MLflow mirror's own process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from collections.abc import Callable

from sqlalchemy import Engine, delete, text, update

from layerwatch_server.storage.base import dialect_insert, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import JobTick

log = logging.getLogger("layerwatch_server.jobs")

JobFn = Callable[[Engine, float], None]  # (engine, now) -> None
_KEEP_TICKS = 1000  # lease rows kept per job


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_once(engine: Engine, job: str, interval_s: float, fn: JobFn, *, replica: str, now: float | None = None) -> bool:
    """Run ``fn`` if this replica wins the current tick of ``job``; True when it ran."""
    now = time.time() if now is None else now
    tick = int(now // interval_s)
    with writer(engine).begin() as conn:
        won = conn.execute(
            dialect_insert(conn, JobTick)
            .values(job=job, tick=tick, replica=replica, started_at=utcnow())
            .on_conflict_do_nothing()
            .returning(JobTick.tick)
        ).first()
    if won is None:
        log.debug("job %s tick=%d skipped (claimed by another replica) replica=%s", job, tick, replica)
        return False
    pg = engine.dialect.name == "postgresql"
    key = zlib.crc32(job.encode())
    with engine.connect() as lock_conn:
        if pg and not lock_conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}):
            log.warning("job %s tick=%d skipped: its previous run is still going", job, tick)
            return False
        try:
            fn(engine, now)
        finally:
            if pg:
                lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                lock_conn.commit()
    with writer(engine).begin() as conn:
        conn.execute(update(JobTick).where(JobTick.job == job, JobTick.tick == tick).values(finished_at=utcnow()))
        conn.execute(delete(JobTick).where(JobTick.job == job, JobTick.tick < tick - _KEEP_TICKS))
    log.debug("job %s tick=%d ran replica=%s", job, tick, replica)
    return True
