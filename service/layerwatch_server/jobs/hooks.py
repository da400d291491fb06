"""The periodic rule hook: later alert rules (stalled runs, ...) register functions here."""

from __future__ import annotations

from sqlalchemy import Engine

from layerwatch_server.storage.ticks import JobFn


def run_hooks(hooks: list[JobFn]) -> JobFn:
    """One scheduled job that runs every registered hook; one failing hook does not stop the others."""

    def job(engine: Engine, now: float) -> None:
        import logging

        for hook in list(hooks):
            try:
                hook(engine, now)
            except Exception:
                logging.getLogger("layerwatch_server.jobs").exception("rule hook %r failed", hook)

    return job
