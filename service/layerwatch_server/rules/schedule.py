"""Alerting on the scheduler: time-based rules (``stalled``) and re-notification of alerts that keep firing.

Like ingest, a tick locks a run's row before its alerts (one lock order for every writer of a run's alerts).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from layerwatch_server.rules import incidents
from layerwatch_server.rules.book import RuleBook
from layerwatch_server.rules.fanout import Clock, Emit, FanOut
from layerwatch_server.rules.lifecycle import Lifecycle
from layerwatch_server.storage.alerts import Obs, alert_dict
from layerwatch_server.storage.base import finite_json, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import AlertRow, Project, Run


class Schedule:
    def __init__(self, book: RuleBook, emit: Emit, fanout: FanOut, *, renotify_s: float, clock: Clock = utcnow) -> None:
        self.book, self.emit, self.fanout, self.clock = book, emit, fanout, clock
        self.renotify_s = renotify_s

    def tick(self, engine: Engine, now_s: float | None = None) -> None:
        """Time-based rules (``stalled``) and re-notification of alerts that keep firing, on ``engine`` (the
        scheduler's job signature)."""
        now = self.clock() if now_s is None else dt.datetime.fromtimestamp(now_s, dt.timezone.utc)
        queued: list[Any] = []
        stalled_runs: list[tuple[str, list[dict[str, Any]]]] = []
        with Session(writer(engine), expire_on_commit=False) as s, s.begin():
            running = s.execute(
                select(Run, Project.name).join(Project, Project.id == Run.project_id).where(Run.status == "running")
            ).all()
            for run, project in running:
                rule = self.book.rules_for(project, run.config).get("stalled")
                if rule is None or rule.threshold is None:
                    continue
                idle = (now - run.last_seen).total_seconds()
                if idle < rule.threshold:
                    continue
                # The run row first, as ingest locks it (then the run's alerts); nothing changed when data came
                # in since it was read.
                stalled = s.execute(
                    update(Run)
                    .where(Run.id == run.id, Run.status == "running", Run.last_seen == run.last_seen)
                    .values(status="stalled")
                )
                if stalled.rowcount == 0:
                    continue
                alerts = {
                    (a.rule, a.layer_key): a for a in s.scalars(select(AlertRow).where(AlertRow.run_id == run.id))
                }

                def transition(row: AlertRow, status: str, obs: Obs | None) -> None:
                    s.add(row)
                    queued.extend(self.emit(s, row, status, obs, now))

                lc = Lifecycle(run.id, project, 0, alerts, {}, transition, now)
                msg = f"run {run.name} has sent nothing for {idle:.0f} s (threshold {rule.threshold:.0f} s)"
                lc.apply(
                    Obs("stalled", "", True, idle, rule.threshold, msg),
                    rule.model_copy(update={"for_": 1}),
                    run.last_step,
                )
                s.add_all(lc.new)
                stalled_runs.append((run.id, [alert_dict(a) for a in (*alerts.values(), *lc.new)]))
            due = now - dt.timedelta(seconds=self.renotify_s)
            # Only an incident's lead has notified_at set: one re-notification per incident, naming its layers.
            for a in s.scalars(select(AlertRow).where(AlertRow.state == "firing", AlertRow.notified_at < due)):
                peers = s.scalars(select(AlertRow).where(AlertRow.run_id == a.run_id, AlertRow.rule == a.rule))
                layers = incidents.incident_layers(peers, a.rule)
                tag = f"-r{int(now.timestamp())}"
                queued.extend(self.emit(s, a, "firing", None, now, tag=tag, layers=layers))
        self.fanout.after_commit(queued)
        for run_id, run_alerts in stalled_runs:
            self.fanout.after_commit([], run_id, finite_json(run_alerts))
