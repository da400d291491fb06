"""The alert model every package shares: what a rule observed (:class:`Obs`) and an alert's public shape
(:func:`alert_dict`). The rules make them, notify, the mirrors and the API read them; here, below all of them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from layerwatch_server.storage.models import AlertRow


@dataclass
class Obs:
    """One rule's observation of one layer (or the run) at one step: breached or not, with its evidence."""

    rule: str
    layer: str  # "" for run-level
    breach: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    series: tuple[str, str, str] | None = None  # ("layer"|"param", name, stat) for evidence


def alert_dict(a: AlertRow) -> dict[str, Any]:
    """The public shape of an alert (API, ingest response, notifications)."""
    return {
        "id": a.id,
        "rule": a.rule,
        "severity": a.severity,
        "state": a.state,
        "run_id": a.run_id,
        "project": a.project,
        "rank": a.rank,
        "layer": a.layer_key or None,
        "step": a.step,
        "value": a.value,
        "threshold": a.threshold,
        "message": a.message,
        "episode": a.episode,
        "started_at": _iso(a.started_at),
        "fired_at": _iso(a.fired_at),
        "resolved_at": _iso(a.resolved_at),
    }


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def list_alerts(
    engine: Engine,
    *,
    project: str | None = None,
    run_id: str | None = None,
    state: str | None = None,
    only: set[str] | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Alerts, newest first, of ``project``/``run_id``/``state`` when given, within the projects ``only``."""
    q = select(AlertRow).order_by(AlertRow.updated_at.desc()).limit(limit)
    if project is not None:
        q = q.where(AlertRow.project == project)
    if run_id is not None:
        q = q.where(AlertRow.run_id == run_id)
    if state is not None:
        q = q.where(AlertRow.state == state)
    if only is not None:
        q = q.where(AlertRow.project.in_(only))
    with Session(engine) as s:
        return [alert_dict(a) for a in s.scalars(q)]


def get_alert(engine: Engine, alert_id: str) -> dict[str, Any] | None:
    """One alert with its evidence, or None."""
    with Session(engine) as s:
        row = s.get(AlertRow, alert_id)
        return None if row is None else {**alert_dict(row), "evidence": row.evidence}
