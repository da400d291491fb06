"""Alerting wired into the collector: rules evaluated on ingest, time-based rules on the scheduler.

Evaluation runs inside the batch's own transaction (:meth:`Alerting.evaluate`, under a savepoint the
ingestor holds, so one commit covers rows, alerts and memory); :meth:`Alerting.on_ingest` runs after the
commit. On PostgreSQL the run's row is locked first (FOR UPDATE; SQLite has one writer), so the ranks and
replicas ingesting a run take turns on its alerts and agree on their states, and every writer of a run's
alerts locks in one order (the run, then its alerts; the scheduler's tick does the same): no deadlocks.
The rank's memory row is only ever written under that lock. Alert changes and their notifications (queued
through the injected ``emit``) commit with the batch; ``deliver`` gets them after the commit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import JSON, Connection, Engine, bindparam, select, update
from sqlalchemy.orm import Session

from layerwatch_server.core.batch import Batch
from layerwatch_server.rules import incidents, store
from layerwatch_server.rules.config import RulesConfig
from layerwatch_server.rules.evaluate import evaluate_step, needs_detail, view
from layerwatch_server.rules.lifecycle import OPEN, Lifecycle
from layerwatch_server.rules.spec import Rule, merge
from layerwatch_server.storage.alerts import Obs, alert_dict
from layerwatch_server.storage.base import LRU, UTCDateTime, dialect_insert, finite_json, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.ingest import Ingestor, IngestResult
from layerwatch_server.storage.models import AlertRow, Project, RuleDef, RuleState, Run

Clock = Callable[[], dt.datetime]


class Emit(Protocol):
    """Queues the notifications of one alert transition in the caller's session (the alert's transaction) and
    returns them, to be handed to :data:`Deliver` after the commit. Notify provides it (``api.alerting`` wires
    it in): the rules say what changed, not where it goes."""

    def __call__(
        self,
        session: Session,
        alert: AlertRow,
        status: str,
        obs: Obs | None,
        now: dt.datetime,
        *,
        tag: str = "",
        layers: list[str] | None = None,
    ) -> list[Any]: ...


Deliver = Callable[[list[Any]], None]  # what Emit queued, after its commit: send it now
HOOK = "alerting"  # the name of the in-transaction hook, and of what it stages on IngestResult

# Built once: Core statements built per batch cost more to compile-cache than to run.
_LOCK_RUN = select(Run.config, Run.nonfinite_origin).where(Run.id == bindparam("id")).with_for_update()
_MEMORY = select(RuleState.data).where(RuleState.run_id == bindparam("r_id"), RuleState.rank == bindparam("r_rank"))
_SAVE_MEMORY = (
    update(RuleState)
    .where(RuleState.run_id == bindparam("r_id"), RuleState.rank == bindparam("r_rank"))
    .values(data=bindparam("r_data", type_=JSON(none_as_null=True)), updated_at=bindparam("r_now", type_=UTCDateTime()))
)


@dataclass
class Staged:
    """What an evaluation leaves for after the commit."""

    current: list[dict[str, Any]]  # the run's alerts, JSON-safe: open ones and those resolved a moment ago
    queued: list[Any]  # notifications (what Emit returned) to deliver


def _json_safe(alert: dict[str, Any]) -> dict[str, Any]:
    """``alert_dict`` output made JSON-safe: value and threshold are its only floats."""
    alert["value"], alert["threshold"] = finite_json(alert["value"]), finite_json(alert["threshold"])
    return alert


def run_overrides(config: dict[str, Any] | None) -> dict[str, Any]:
    """Per-run rule overrides the client sent (``watch(..., rules={...})``)."""
    config = config or {}
    rules = (config.get("hparams") or {}).get("rules") or config.get("rules") or {}
    return rules if isinstance(rules, dict) else {}


class Alerting:
    def __init__(
        self,
        engine: Engine,
        cfg: RulesConfig,
        *,
        emit: Emit,
        deliver: Deliver,
        renotify_s: float,
        resolved_visible_s: float,
        clock: Clock = utcnow,
        cache_s: float = 2.0,
    ) -> None:
        self.engine, self.cfg, self.clock, self.cache_s = engine, cfg, clock, cache_s
        self.emit, self.deliver = emit, deliver
        self.renotify_s, self.resolved_visible_s = renotify_s, resolved_visible_s
        # Called with (run_id, the run's current alerts) after each evaluation: the Prometheus snapshot.
        self.listeners: list[Callable[[str, list[dict[str, Any]]], None]] = []
        self._db_rules: tuple[float, dict[str, dict[str, Any]]] = (-1e18, {})
        self._merged = LRU(256)  # (project, overrides) -> (config, API rules, merged rules)
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
        """The effective rules of a run. Merged (every rule validated) once per project, run overrides, rules
        file and re-read of the API rules, not per batch; the result is shared: read it, do not change it."""
        cfg, db, overrides = self.cfg, self.db_rules(), run_overrides(run_config)
        key = (project, json.dumps(overrides, sort_keys=True, default=str))
        with self._lock:
            hit = self._merged.get(key)
        if hit is not None and hit[0] is cfg and hit[1] is db:
            return hit[2]
        rules = merge([cfg.rules, db, cfg.projects.get(project, {}), overrides], project)
        with self._lock:
            self._merged.put(key, (cfg, db, rules))
        return rules

    # -- ingest ---------------------------------------------------------------------------------------------
    def attach(self, ingestor: Ingestor) -> None:
        """Evaluate inside each batch's transaction (one commit per batch); :meth:`on_ingest` finishes after it."""
        ingestor.in_transaction[HOOK] = self.evaluate

    def evaluate(self, conn: Connection, batch: Batch, res: IngestResult) -> Staged:
        """The in-transaction hook: rules on the batch, alert and outbox rows written on ``conn`` (the ingestor
        holds a savepoint around this, so a failure here costs the batch's alerts, never the batch)."""
        with Session(bind=conn, join_transaction_mode="rollback_only", expire_on_commit=False) as s:
            staged = self._evaluate(s, batch, res)
            s.flush()
        return staged

    def on_ingest(self, batch: Batch, res: IngestResult) -> list[dict[str, Any]]:
        """The ingest hook, after the commit: hand queued notifications to the sender, tell the listeners, and
        return the run's current alerts (the 202 answer carries them)."""
        staged = res.staged.get(HOOK)
        if staged is None:  # evaluation failed and was rolled back (logged by the ingestor)
            return []
        if staged.queued:
            self.deliver(staged.queued)
        self._tell(res.run_id, staged.current)
        return staged.current

    def _evaluate(self, s: Session, batch: Batch, res: IngestResult) -> Staged:
        now = self.clock()
        queued: list[Any] = []
        conn = s.connection()
        config, origin = conn.execute(_LOCK_RUN, {"id": res.run_id}).one()
        mem = self._memory(conn, res.run_id, batch.rank, now)
        rules = self.rules_for(batch.run.project, config)  # the batch's config is the run's by now (first wins)
        alerts = store.load(conn, res.run_id)
        ordered = sorted((x for x in batch.steps if x.step > mem.get("last_step", -1)), key=lambda x: x.step)

        events: list[tuple[AlertRow, str, Obs | None]] = []

        def transition(row: AlertRow, status: str, obs: Obs | None) -> None:
            events.append((row, status, obs))

        def send(row: AlertRow, status: str, obs: Obs | None, layers: list[str]) -> None:
            queued.extend(self.emit(s, row, status, obs, now, layers=layers))

        counters = mem.setdefault("counters", {})
        lc = Lifecycle(res.run_id, batch.run.project, batch.rank, alerts, counters, transition, now, store.AlertRecord)
        for i, step in enumerate(ordered):
            # A report is the batch's last step, or any step closing a dead-unit window; other steps only
            # need their layers when something in them is non-finite.
            window_end, bad = needs_detail(batch, step)
            report = i == len(ordered) - 1 or window_end
            v = view(batch, step, detailed=report or bad)
            for obs in evaluate_step(rules, v, mem, origin, report):
                lc.apply(obs, rules[obs.rule], v.step)
        stalled = alerts.get(("stalled", ""))
        if ordered and stalled is not None and stalled.state in OPEN:
            lc.resolve(stalled, None, ordered[-1].step, "the run is sending data again")
        if ordered:
            mem["last_step"] = ordered[-1].step
        incidents.page(events, alerts.values(), send)  # one page per (run, rule) incident
        store.save(conn, alerts.values())
        conn.execute(_SAVE_MEMORY, {"r_id": res.run_id, "r_rank": batch.rank, "r_data": mem, "r_now": now})
        keep = dt.timedelta(seconds=self.resolved_visible_s)
        current = [
            _json_safe(alert_dict(a))
            for a in alerts.values()
            if a.state in OPEN or (a.resolved_at and now - a.resolved_at < keep)
        ]
        return Staged(current, queued)

    def _tell(self, run_id: str, alerts: list[dict[str, Any]]) -> None:
        for listener in self.listeners:
            try:
                listener(run_id, alerts)
            except Exception:  # an observer must not fail an ingest or a tick
                logging.getLogger("layerwatch_server.rules").exception("alert listener %r failed", listener)

    @staticmethod
    def _memory(conn: Connection, run_id: str, rank: int, now: dt.datetime) -> dict[str, Any]:
        """The rank's evaluation memory (a fresh copy: JSON decoded). No lock of its own: only an evaluation
        writes it, and evaluations of a run hold the run row's lock."""
        key = {"r_id": run_id, "r_rank": rank}
        row = conn.execute(_MEMORY, key).first()
        if row is None:  # first batch of this rank
            conn.execute(
                dialect_insert(conn, RuleState)
                .values(run_id=run_id, rank=rank, data={}, updated_at=now)
                .on_conflict_do_nothing()
            )
            row = conn.execute(_MEMORY, key).one()
        return row[0] or {}

    # -- schedule ------------------------------------------------------------------------------------------
    def tick(self, engine: Engine, now_s: float | None = None) -> None:
        """Time-based rules (``stalled``) and re-notification of alerts that keep firing."""
        now = self.clock() if now_s is None else dt.datetime.fromtimestamp(now_s, dt.timezone.utc)
        queued: list[Any] = []
        stalled_runs: list[tuple[str, list[dict[str, Any]]]] = []
        with Session(writer(self.engine), expire_on_commit=False) as s, s.begin():
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
        if queued:
            self.deliver(queued)
        for run_id, run_alerts in stalled_runs:
            self._tell(run_id, finite_json(run_alerts))
