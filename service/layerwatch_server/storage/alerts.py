"""The alert model every package shares: what a rule observed (:class:`Obs`) and an alert's public shape
(:func:`alert_dict`). The rules make them, notify, the mirrors and the API read them; here, below all of them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

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
