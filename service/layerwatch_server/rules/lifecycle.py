"""Alert lifecycle: observations -> pending -> firing -> resolved, one alert per (run, rule, layer).

A breach counts towards the rule's ``for``; below it the alert is pending, at it the alert fires (and a
notification may be queued: ``rules.incidents`` pages once per (run, rule) incident). The first clean observation
resolves a pending alert, ``clear`` of them in a row a firing one; a resolved alert that breaches again re-opens
the same row with a new episode, so its notifications get fresh idempotency keys.

The ranks of a DDP run share the run's alerts but see different data (their own loss, activations and
saturation), so near a bound one rank may breach while another does not. An open alert belongs to the rank that
breached last (its ``rank``, with that breach as evidence): only that rank's clean observation resolves it, so
two ranks on either side of a bound do not resolve and re-open it at every batch.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable

from layerwatch_server.rules.spec import Rule
from layerwatch_server.storage.alerts import Obs
from layerwatch_server.storage.models import OPEN_ALERT_STATES, AlertRow

OPEN = OPEN_ALERT_STATES
Transition = Callable[[AlertRow, str, Obs | None], None]  # (alert, "firing"|"resolved", obs)


class Lifecycle:
    """Applies one rank's observations to the run's alerts (rows loaded by the caller, in one transaction)."""

    def __init__(
        self,
        run_id: str,
        project: str,
        rank: int,
        alerts: dict[tuple[str, str], AlertRow],
        counters: dict[str, int],
        on_transition: Transition,
        now: dt.datetime,
        new_row: Callable[..., AlertRow] = AlertRow,
    ) -> None:
        """``new_row`` makes the row of a new alert (``AlertRow`` or ``rules.store.AlertRecord``, which the
        ingest path writes itself)."""
        self.run_id, self.project, self.rank = run_id, project, rank
        self.alerts, self.counters = alerts, counters
        self.on_transition, self.now, self.new_row = on_transition, now, new_row
        self.new: list[AlertRow] = []

    def apply(self, obs: Obs, rule: Rule, step: int | None) -> None:
        key = f"{obs.rule}|{obs.layer}"
        row = self.alerts.get((obs.rule, obs.layer))
        if not obs.breach:
            self.counters.pop(key, None)
            if row is not None and row.state in OPEN and row.rank == self.rank:
                # a firing alert clears after `clear` clean observations in a row (a diverging loss that dips
                # for a step is one incident); a pending one, never announced, at the first
                clean = self.counters[f"{key}|clean"] = self.counters.get(f"{key}|clean", 0) + 1
                if row.state == "pending" or clean >= rule.clear:
                    self.counters.pop(f"{key}|clean", None)
                    self.resolve(row, obs, step)
            return
        self.counters.pop(f"{key}|clean", None)
        n = self.counters[key] = self.counters.get(key, 0) + 1
        if row is None or row.state == "resolved":
            row = self._open(row, obs, rule, step)
        elif row.state == "pending" or row.rank != self.rank:  # a firing alert changes hands with its evidence
            self._evidence(row, obs, step)
        if n >= rule.for_ and row.state == "pending":  # the evidence is this observation's already
            row.state, row.fired_at, row.updated_at = "firing", self.now, self.now
            self.on_transition(row, "firing", obs)

    def resolve(self, row: AlertRow, obs: Obs | None, step: int | None, message: str | None = None) -> None:
        was_firing = row.state == "firing"
        row.state, row.resolved_at, row.updated_at = "resolved", self.now, self.now
        if message:
            row.message = message
        if was_firing:  # a pending alert that never fired was never announced
            self.on_transition(row, "resolved", obs)

    def _open(self, row: AlertRow | None, obs: Obs, rule: Rule, step: int | None) -> AlertRow:
        if row is None:
            row = self.new_row(
                id=secrets.token_hex(6),
                run_id=self.run_id,
                project=self.project,
                rule=obs.rule,
                layer_key=obs.layer,
                episode=1,
            )
            self.alerts[(obs.rule, obs.layer)] = row
            self.new.append(row)
        else:
            row.episode += 1
        row.severity, row.state = rule.severity, "pending"
        row.started_at, row.fired_at, row.resolved_at, row.notified_at = self.now, None, None, None
        self._evidence(row, obs, step)
        return row

    def _evidence(self, row: AlertRow, obs: Obs, step: int | None) -> None:
        row.rank = self.rank
        row.step, row.threshold, row.message, row.updated_at = step, obs.threshold, obs.message[:2000], self.now
        row.value = obs.value
