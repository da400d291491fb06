"""Alerts onto an MLflow run: one tag per rule and an artifact listing every alert with its evidence.

Alert dicts carry ``id, rule, severity, state, run_id, layer, step, value, threshold, message``. The tag
``layerwatch.alert.<rule>`` is ``firing`` while any alert of that rule fires, else the latest state; the
artifacts ``layerwatch/alerts.json`` (machine-readable) and ``layerwatch/alerts.md`` (for people) are
rewritten in full each time, so they always list the run's current alerts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from layerwatch_server.mirrors import naming
from layerwatch_server.storage.base import finite_json

FIELDS = ("id", "rule", "severity", "state", "run_id", "layer", "step", "value", "threshold", "message")


def alert_tags(alerts: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``layerwatch.alert.<rule>`` -> firing | <latest state>, plus the number of alerts firing."""
    by_rule: dict[str, list[Mapping[str, Any]]] = {}
    for a in alerts:
        by_rule.setdefault(str(a["rule"]), []).append(a)
    tags: dict[str, str] = {}
    firing_total = 0
    for rule, items in sorted(by_rule.items()):
        firing = [a for a in items if a.get("state") == "firing"]
        firing_total += len(firing)
        latest = max(items, key=lambda a: (a.get("step") or -1, str(a.get("id"))))
        key = naming.safe_key(f"layerwatch.alert.{rule}")
        tags[key] = "firing" if firing else str(latest.get("state"))
        layers = sorted({str(a["layer"]) for a in firing if a.get("layer")})
        if layers:
            tags[key + ".layers"] = ",".join(layers)[: naming.MAX_TAG_VALUE_LEN]
    tags["layerwatch.alerts.firing"] = str(firing_total)
    return tags


def alerts_markdown(alerts: Iterable[Mapping[str, Any]]) -> str:
    rows = ["| state | severity | rule | layer | step | value | threshold | message |", "|---" * 8 + "|"]
    order = {"firing": 0}
    for a in sorted(alerts, key=lambda a: (order.get(str(a.get("state")), 1), str(a.get("rule")), a.get("step") or 0)):
        cells = [
            a.get("state"),
            a.get("severity"),
            a.get("rule"),
            a.get("layer") or "",
            a.get("step"),
            _fmt(a.get("value")),
            _fmt(a.get("threshold")),
            str(a.get("message") or "").replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "# layerwatch alerts\n\n" + "\n".join(rows) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def mirror_alerts(client: Any, mlflow_run_id: str, alerts: list[dict[str, Any]]) -> None:
    """Tags and artifacts for ``alerts`` (all of the run's alerts, latest state of each)."""
    from mlflow.entities import RunTag

    tags = [RunTag(k, v) for k, v in alert_tags(alerts).items()]
    for i in range(0, len(tags), 100):
        client.log_batch(mlflow_run_id, tags=tags[i : i + 100], synchronous=True)
    evidence = [{k: a.get(k) for k in FIELDS} for a in alerts]
    client.log_dict(mlflow_run_id, finite_json(evidence), "layerwatch/alerts.json")
    client.log_text(mlflow_run_id, alerts_markdown(alerts), "layerwatch/alerts.md")
