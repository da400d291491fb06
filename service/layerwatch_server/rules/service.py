"""Alerting wired into the collector: rules evaluated on ingest, time-based rules on the scheduler.

Evaluation runs in the ingest request, right after the batch commits, in its own transaction: the rank's
memory row is locked first (a write, so SQLite takes its writer lock up front; FOR UPDATE on
PostgreSQL), so replicas ingesting the same run take turns and agree on counters and alert states.
Alert changes and their outbox rows commit together; the sender is woken after the commit.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from layerwatch_server.core.batch import Batch
from layerwatch_server.notify.outbox import enqueue
from layerwatch_server.notify.sender import Sender
from layerwatch_server.rules.config import AlertingConfig
from layerwatch_server.rules.evaluate import Obs, evaluate_step, needs_detail, view
from layerwatch_server.rules.lifecycle import OPEN, Lifecycle, alert_dict
from layerwatch_server.rules.spec import Rule, merge
from layerwatch_server.storage.base import finite_json, utcnow
from layerwatch_server.storage.ingest import IngestResult
from layerwatch_server.storage.models import AlertRow, OutboxRow, Project, RuleDef, RuleState, Run

Clock = Callable[[], dt.datetime]


def run_overrides(config: dict[str, Any] | None) -> dict[str, Any]:
    """Per-run rule overrides the client sent (``watch(..., rules={...})``)."""
    config = config or {}
    rules = (config.get("hparams") or {}).get("rules") or config.get("rules") or {}
    return rules if isinstance(rules, dict) else {}


class Alerting:
    def __init__(self, engine: Engine, cfg: AlertingConfig, *, clock: Clock = utcnow, cache_s: float = 2.0) -> None:
        self.engine, self.cfg, self.clock, self.cache_s = engine, cfg, clock, cache_s
        self.sender = Sender(engine, lambda: self.cfg)
        # Called with (run_id, the run's current alerts) after each evaluation: the Prometheus snapshot.
        self.listeners: list[Callable[[str, list[dict[str, Any]]], None]] = []
        self._db_rules: tuple[float, dict[str, dict[str, Any]]] = (-1e18, {})
        self._lock = threading.Lock()

    # -- rules --------------------------------------------------------------------------------------------
    def db_rules(self) -> dict[str, dict[str, Any]]:
        """Rules set through the API, re-read at most every ``cache_s`` (other replicas may change them)."""
        at, rules = self._db_rules
        if time.monotonic() - at > self.cache_s:
            with self.engine.connect() as conn:
                rules = {n: s for n, s in conn.execute(select(RuleDef.name, RuleDef.spec))}
            self._db_rules = (time.monotonic(), rules)
        return rules

    def invalidate(self) -> None:
        self._db_rules = (-1e18, {})

    def rules_for(self, project: str, run_config: dict[str, Any] | None) -> dict[str, Rule]:
        levels = [self.cfg.rules, self.db_rules(), self.cfg.projects.get(project, {}), run_overrides(run_config)]
        return merge(levels, project)

    # -- ingest ---------------------------------------------------------------------------------------------
    def on_ingest(self, batch: Batch, res: IngestResult) -> list[dict[str, Any]]:
        now = self.clock()
        queued: list[OutboxRow] = []
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            mem_row = self._lock_memory(s, res.run_id, batch.rank, now)
            mem = copy.deepcopy(mem_row.data or {})
            run = s.get(Run, res.run_id)
            assert run is not None
            rules = self.rules_for(batch.run.project, run.config or batch.run.config)
            alerts = {(a.rule, a.layer_key): a for a in s.scalars(select(AlertRow).where(AlertRow.run_id == run.id))}
            last = mem.get("last_step", -1)
            steps = [x for x in batch.steps if x.step > last]

            def transition(row: AlertRow, status: str, obs: Obs | None) -> None:
                s.add(row)
                queued.extend(enqueue(s, self.cfg, row, status, obs, now))

            lc = Lifecycle(
                run.id, batch.run.project, batch.rank, alerts, mem.setdefault("counters", {}), transition, now
            )
            ordered = sorted(steps, key=lambda x: x.step)
            for i, step in enumerate(ordered):
                # A report is the batch's last step, or any step closing a dead-unit window; other steps only
                # need their layers when something in them is non-finite.
                window_end, bad = needs_detail(batch, step)
                report = i == len(ordered) - 1 or window_end
                v = view(batch, step, detailed=report or bad)
                for obs in evaluate_step(rules, v, mem, run.nonfinite_origin, report):
                    lc.apply(obs, rules[obs.rule], v.step)
            stalled = alerts.get(("stalled", ""))
            if steps and stalled is not None and stalled.state in OPEN:
                lc.resolve(stalled, None, max(x.step for x in steps), "the run is sending data again")
            if steps:
                mem["last_step"] = max(last, *(x.step for x in steps))
            s.add_all(lc.new)
            mem_row.data, mem_row.updated_at = mem, now
        if queued:
            self.sender.hand(queued)
        keep = dt.timedelta(seconds=self.cfg.notify.resolved_visible_s)
        current = finite_json(
            [
                alert_dict(a)
                for a in alerts.values()
                if a.state in OPEN or (a.resolved_at and now - a.resolved_at < keep)
            ]
        )
        self._tell(res.run_id, current)
        return current

    def _tell(self, run_id: str, alerts: list[dict[str, Any]]) -> None:
        for listener in self.listeners:
            try:
                listener(run_id, alerts)
            except Exception:  # an observer must not fail an ingest or a tick
                logging.getLogger("layerwatch_server.rules").exception("alert listener %r failed", listener)

    def _lock_memory(self, s: Session, run_id: str, rank: int, now: dt.datetime) -> RuleState:
        insert = postgresql.insert if s.bind.dialect.name == "postgresql" else sqlite.insert  # type: ignore[union-attr]
        s.execute(insert(RuleState).values(run_id=run_id, rank=rank, data={}, updated_at=now).on_conflict_do_nothing())
        q = select(RuleState).where(RuleState.run_id == run_id, RuleState.rank == rank).with_for_update()
        return s.scalars(q).one()

    # -- schedule ------------------------------------------------------------------------------------------
    def tick(self, engine: Engine, now_s: float | None = None) -> None:
        """Time-based rules (``stalled``) and re-notification of alerts that keep firing."""
        now = self.clock() if now_s is None else dt.datetime.fromtimestamp(now_s, dt.timezone.utc)
        queued: list[OutboxRow] = []
        stalled_runs: list[tuple[str, list[dict[str, Any]]]] = []
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            running = s.execute(
                select(Run, Project.name).join(Project, Project.id == Run.project_id).where(Run.status == "running")
            ).all()
            for run, project in running:
                rule = self.rules_for(project, run.config).get("stalled")
                if rule is None or rule.threshold is None:
                    continue
                idle = (now - run.last_seen).total_seconds()
                if idle < rule.threshold:
                    continue
                alerts = {
                    (a.rule, a.layer_key): a for a in s.scalars(select(AlertRow).where(AlertRow.run_id == run.id))
                }

                def transition(row: AlertRow, status: str, obs: Obs | None) -> None:
                    s.add(row)
                    queued.extend(enqueue(s, self.cfg, row, status, obs, now))

                lc = Lifecycle(run.id, project, 0, alerts, {}, transition, now)
                msg = f"run {run.name} has sent nothing for {idle:.0f} s (threshold {rule.threshold:.0f} s)"
                lc.apply(
                    Obs("stalled", "", True, idle, rule.threshold, msg),
                    rule.model_copy(update={"for_": 1}),
                    run.last_step,
                )
                s.add_all(lc.new)
                s.execute(update(Run).where(Run.id == run.id, Run.status == "running").values(status="stalled"))
                stalled_runs.append((run.id, [alert_dict(a) for a in (*alerts.values(), *lc.new)]))
            due = now - dt.timedelta(seconds=self.cfg.notify.renotify_s)
            for a in s.scalars(select(AlertRow).where(AlertRow.state == "firing", AlertRow.notified_at < due)):
                queued.extend(enqueue(s, self.cfg, a, "firing", None, now, tag=f"-r{int(now.timestamp())}"))
        if queued:
            self.sender.hand(queued)
        for run_id, run_alerts in stalled_runs:
            self._tell(run_id, finite_json(run_alerts))
