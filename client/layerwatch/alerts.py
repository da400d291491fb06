"""Alerts of this run as the training process sees them: the collector's, and the client's own early ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alert:
    """One alert of the run: which rule, where, and the evidence (the collector's fields)."""

    id: str
    rule: str
    state: str  # pending | firing | resolved
    severity: str = "warning"
    run_id: str | None = None
    layer: str | None = None
    step: int | None = None
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # "local": raised by the client itself within the step that showed it (non_finite, loss_spike), before any
    # collector has seen the data; the collector's alert for the same incident replaces it without a second
    # on_alert call. "collector": returned by the collector.
    source: str = "collector"

    @property
    def local(self) -> bool:
        return self.source == "local"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        return cls(
            id=str(data.get("id")),
            rule=str(data.get("rule", "")),
            state=str(data.get("state", "firing")),
            severity=str(data.get("severity", "warning")),
            run_id=data.get("run_id"),
            layer=data.get("layer"),
            step=data.get("step"),
            value=_number(data.get("value")),
            threshold=_number(data.get("threshold")),
            message=str(data.get("message", "")),
            raw=data,
        )


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None  # "NaN"/"Infinity" strings included
    except (TypeError, ValueError):
        return None
