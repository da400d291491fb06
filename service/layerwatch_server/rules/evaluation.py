"""Rules evaluated on ingest, inside the batch's own transaction.

:meth:`Evaluation.evaluate` runs under a savepoint the ingestor holds, so one commit covers rows, alerts and
memory; :meth:`Evaluation.on_ingest` runs after the commit. On PostgreSQL the run's row is locked first (FOR
UPDATE; SQLite has one writer), so the ranks and replicas ingesting a run take turns on its alerts and agree on
their states, and every writer of a run's alerts locks in one order (the run, then its alerts; the schedule's
tick does the same): no deadlocks. The rank's memory row is only ever written under that lock. Alert changes
and their notifications (queued through ``emit``) commit with the batch; the fan-out delivers them after it.

A rank's steps are judged as a series, in step order: its memory holds the history the loss and gradient rules
compare against, the ``for`` counts, and the last step judged. The collector writes a rank's batches in the
order the rank made them (``api.order``), so the steps of a batch normally all come after that last step. Those
of a batch that comes later after all (its turn was not waited for any longer: lost for a while, or sent to
another replica) are *late*: they are stored as any others and judged by the rules that need no history
(``STATELESS``: NaN/Inf, dead units, saturation, thresholds), whose breaches open or keep alerts as any breach
does, counted on their own (a late step never adds to, nor resets, the ``for`` count of the steps in order);
their clean observations resolve nothing (a later step has spoken since), and the history-based rules do not
see them. Steps of a batch that stored nothing new (a batch sent again) are not judged twice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, bindparam, select, update
from sqlalchemy.orm import Session

from layerwatch_server.core.batch import Batch, StepIn
from layerwatch_server.rules import incidents, store
from layerwatch_server.rules.book import RuleBook
from layerwatch_server.rules.evaluate import evaluate_step, needs_detail, view
from layerwatch_server.rules.fanout import Clock, Emit, FanOut
from layerwatch_server.rules.lifecycle import OPEN, Lifecycle
from layerwatch_server.rules.spec import Rule
from layerwatch_server.storage.alerts import Obs, alert_dict
from layerwatch_server.storage.base import UTCDateTime, dialect_insert, finite_json, utcnow
from layerwatch_server.storage.ingest import Ingestor, IngestResult
from layerwatch_server.storage.models import AlertRow, RuleState, Run

HOOK = "alerting"  # the name of the in-transaction hook, and of what it stages on IngestResult
STATELESS = frozenset({"non_finite", "dead_units", "saturation", "threshold"})  # the rules judging late steps

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


class Evaluation:
    def __init__(
        self, book: RuleBook, emit: Emit, fanout: FanOut, *, resolved_visible_s: float, clock: Clock = utcnow
    ) -> None:
        self.book, self.emit, self.fanout, self.clock = book, emit, fanout, clock
        self.resolved_visible_s = resolved_visible_s

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
        """The ingest hook, after the commit: deliver the queued notifications, tell the listeners, and
        return the run's current alerts (the 202 answer carries them)."""
        staged = res.staged.get(HOOK)
        if staged is None:  # evaluation failed and was rolled back (logged by the ingestor)
            return []
        self.fanout.after_commit(staged.queued, res.run_id, staged.current)
        return staged.current

    def _evaluate(self, s: Session, batch: Batch, res: IngestResult) -> Staged:
        now = self.clock()
        queued: list[Any] = []
        conn = s.connection()
        config, origin = conn.execute(_LOCK_RUN, {"id": res.run_id}).one()
        mem = self._memory(conn, res.run_id, batch.rank, now)
        rules = self.book.rules_for(batch.run.project, config)  # the batch's config is the run's by now (first wins)
        alerts = store.load(conn, res.run_id)
        last = mem.get("last_step", -1)
        ordered = sorted((x for x in batch.steps if x.step > last), key=lambda x: x.step)
        late = sorted((x for x in batch.steps if x.step <= last), key=lambda x: x.step) if res.steps else []

        events: list[tuple[AlertRow, str, Obs | None]] = []

        def transition(row: AlertRow, status: str, obs: Obs | None) -> None:
            events.append((row, status, obs))

        def send(row: AlertRow, status: str, obs: Obs | None, layers: list[str]) -> None:
            queued.extend(self.emit(s, row, status, obs, now, layers=layers))

        if late:  # before the steps in order, which came after them; counted apart, with no history
            stateless = {name: r for name, r in rules.items() if r.kind in STATELESS}
            lc = Lifecycle(res.run_id, batch.run.project, batch.rank, alerts, {}, transition, now, store.AlertRecord)
            self._judge(batch, late, stateless, {}, origin, lc, breaches_only=True)
        counters = mem.setdefault("counters", {})
        lc = Lifecycle(res.run_id, batch.run.project, batch.rank, alerts, counters, transition, now, store.AlertRecord)
        self._judge(batch, ordered, rules, mem, origin, lc)
        stalled = alerts.get(("stalled", ""))
        if ordered and stalled is not None and stalled.state in OPEN:
            lc.resolve(stalled, None, ordered[-1].step, "the run is sending data again")
        if ordered:
            mem["last_step"] = ordered[-1].step
        incidents.page(events, alerts.values(), send)  # one page per (run, rule) incident
        store.save(conn, alerts.values())
        if not batch.preview:  # a preview's steps come again, combined: they are remembered from there
            conn.execute(_SAVE_MEMORY, {"r_id": res.run_id, "r_rank": batch.rank, "r_data": mem, "r_now": now})
        keep = dt.timedelta(seconds=self.resolved_visible_s)
        current = [
            _json_safe(alert_dict(a))
            for a in alerts.values()
            if a.state in OPEN or (a.resolved_at and now - a.resolved_at < keep)
        ]
        return Staged(current, queued)

    @staticmethod
    def _judge(
        batch: Batch,
        steps: list[StepIn],
        rules: dict[str, Rule],
        mem: dict[str, Any],
        origin: dict[str, Any] | None,
        lc: Lifecycle,
        breaches_only: bool = False,
    ) -> None:
        """``steps`` (in step order) through ``rules``, their observations through ``lc``."""
        for i, step in enumerate(steps):
            # A report is the last step, or any step closing a dead-unit window; other steps only need their
            # layers when something in them is non-finite.
            window_end, bad = needs_detail(batch, step)
            report = i == len(steps) - 1 or window_end
            v = view(batch, step, detailed=report or bad)
            for obs in evaluate_step(rules, v, mem, origin, report):
                if obs.breach or not breaches_only:
                    lc.apply(obs, rules[obs.rule], v.step)

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
