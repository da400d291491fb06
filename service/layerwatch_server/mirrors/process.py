"""The MLflow mirror in a process of its own, so its reading, converting and HTTP never take ingest's CPU.

Run in the collector's process, the mirror halved what the embedded collector ingests (a 100-layer run:
12.7k layer-rows/s with it, 26k/s without): its ticks hold the GIL that every ingest request needs.
:class:`MirrorProcess` starts it as a spawned child of the collector and supervises it: a child that dies is
started again (1 s, 2 s, ... 60 s apart), and it stops with the collector (or by itself when the collector
is gone). ``layerwatch-server mirror`` runs the same loop in the foreground (:func:`serve`), for a
Deployment of its own.

Nothing about what is mirrored changes: the loop runs the mirror's job through ``storage.ticks.run_once``
every ``mlflow_interval_s``, so one process per tick mirrors whatever the number of replicas, and the cursor
lives in the database (``mlflow_mirror``): a restarted child reads the rows past it and carries on, and a
tick cut short is sent again (MLflow keeps one value per key, step and timestamp). The child's counters live
in shared memory, so the collector's ``/metrics`` reports them as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from layerwatch_server.core.backoff import backoff_s
from layerwatch_server.mirrors.mlflow_mirror import MirrorConfig, MlflowMirror

log = logging.getLogger("layerwatch_server.mirrors")

JOB = "mlflow"
COUNTERS = ("lag_steps", "lag_seconds", "errors_total", "metrics_total", "requests_total", "last_success")
MAX_RESTART_WAIT_S = 60.0
STOP_WAIT_S = 25.0  # a tick in flight finishes its MLflow request (20 s timeout) or is cut short
MIRROR_NICENESS = 19  # where SCHED_IDLE is not to be had


@dataclass(frozen=True)
class MirrorJob:
    """What the mirror's process needs (picklable: it crosses into a spawned interpreter)."""

    config: MirrorConfig
    db_url: str
    interval_s: float
    db_timeout_s: float = 10.0
    log_level: str = "info"


def job_from_settings(settings: Any) -> MirrorJob | None:
    """The mirror's job the settings ask for, or None when mirroring is off."""
    from layerwatch_server.mirrors.mlflow_mirror import from_settings

    mirror = from_settings(settings)
    if mirror is None:
        return None
    return MirrorJob(
        mirror.config, settings.db_url, settings.mlflow_interval_s, settings.db_timeout_s, settings.log_level
    )


def run_loop(job: MirrorJob, stop: Any, counters: Any = None, *, alive: Any = None) -> None:
    """Run the mirror's job on every tick until ``stop`` is set or ``alive()`` turns false.

    A failing tick (database away, a bug) is logged and the next tick tries again; MLflow being away is the
    mirror's own business (it backs off and keeps its cursor).
    """
    from layerwatch_server.storage.engine import make_engine
    from layerwatch_server.storage.ticks import replica_id, run_once

    # The collector's checkpointer moves the SQLite WAL; the mirror's small cursor commits never do.
    engine = make_engine(job.db_url, timeout_s=job.db_timeout_s, pool_size=2, background_checkpoint=True)
    mirror = MlflowMirror(job.config)
    replica = f"{replica_id()}:mirror"
    try:
        while not stop.is_set() and (alive is None or alive()):
            try:
                run_once(engine, JOB, job.interval_s, mirror.tick, replica=replica)
            except Exception:
                log.exception("MLflow mirror tick failed")
            if counters is not None:
                counters[:] = [float(getattr(mirror, name)) for name in COUNTERS]
            now = time.time()  # the next tick at the same instants as every other replica's
            stop.wait(max(0.01, (now // job.interval_s + 1) * job.interval_s - now))
    finally:
        engine.dispose()


def background() -> None:
    """Run this process on CPU time nothing else wants: ingest (and its clients' latency) always goes first.

    SCHED_IDLE where Linux has it (no privilege needed to lower one's own class), else the lowest niceness
    that still leaves ingest ahead. Measured on 2 shared cores, a mirror at the same priority halved ingest's
    wall rate, and one at niceness 10 still took 7-19%. The mirror keeps pace anyway: what it sends per tick
    is bounded (``max_metrics_per_tick``), so a tick needs little CPU whatever the run's rate.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(MIRROR_NICENESS)


def _child(job: MirrorJob, counters: Any) -> None:
    """The spawned process: logs like the collector, ignores Ctrl-C (the collector stops it), ends its tick
    on SIGTERM, and ends by itself when the collector is gone.

    SIGTERM rather than a shared ``multiprocessing.Event``: a child killed while waiting on one leaves its
    condition counting a sleeper that never wakes, and the next ``set()`` hangs.
    """
    background()
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.basicConfig(level=job.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = multiprocessing.parent_process()
    run_loop(job, stop, counters, alive=parent.is_alive if parent is not None else None)


class MirrorProcess:
    """A supervised child process running the mirror; its counters read like :class:`MlflowMirror`'s."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and open sockets
        self._counters = self._ctx.Array("d", len(COUNTERS), lock=False)
        self._closing = threading.Event()
        self._proc: Any = None
        self._started_at = 0.0
        self._supervisor = threading.Thread(target=self._supervise, name="layerwatch-mirror-supervisor", daemon=True)
        self.restarts = 0

    def __getattr__(self, name: str) -> float:
        if name in COUNTERS:
            value = self._counters[COUNTERS.index(name)]
            return int(value) if name.endswith(("_total", "_steps")) else value
        raise AttributeError(name)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        self._spawn()
        self._supervisor.start()

    def _spawn(self) -> None:
        self._proc = self._ctx.Process(
            target=_child, args=(self.job, self._counters), name="layerwatch-mlflow-mirror", daemon=True
        )
        self._proc.start()
        self._started_at = time.monotonic()
        log.info("MLflow mirror running in process %d", self._proc.pid)

    def _supervise(self) -> None:
        failures = 0
        while not self._closing.is_set():
            self._proc.join(timeout=1.0)
            if self._closing.is_set() or self._proc.is_alive():
                continue
            # a child that ran a while before dying starts the backoff anew
            failures = 1 if time.monotonic() - self._started_at > MAX_RESTART_WAIT_S else failures + 1
            wait = backoff_s(failures, max_s=MAX_RESTART_WAIT_S, jitter=0.0)
            log.error("MLflow mirror process exited with %s; starting it again in %.0fs", self._proc.exitcode, wait)
            if self._closing.wait(wait):
                return
            self._spawn()
            self.restarts += 1

    def stop(self) -> None:
        """Ask the child to finish its tick and exit; kill it if it does not within ``STOP_WAIT_S``."""
        self._closing.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        proc = self._proc
        if proc is None or not proc.is_alive():
            return
        proc.terminate()  # SIGTERM: the child finishes its tick
        proc.join(timeout=STOP_WAIT_S)
        if proc.is_alive():
            log.warning("MLflow mirror process %d did not stop; killing it", proc.pid)
            proc.kill()
            proc.join(timeout=5)


def serve(job: MirrorJob) -> None:
    """``layerwatch-server mirror``: the loop in the foreground until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("MLflow mirror: every %.1fs to %s", job.interval_s, job.config.tracking_uri)
    run_loop(job, stop)
