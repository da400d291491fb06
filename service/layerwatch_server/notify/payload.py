"""What a notification says: the alert plus its context (run, rank, recent reports, NaN origin, links).

The generic webhook receives :func:`build` as JSON (documented in docs/alerts.md); Slack, Alertmanager
and email render the same dict.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from layerwatch_server.notify.config import Notify
from layerwatch_server.storage.alerts import Obs, alert_dict
from layerwatch_server.storage.base import finite_json
from layerwatch_server.storage.models import AlertRow, Layer, Param, Run, layer_stats, param_stats

RECENT = 5  # reports of the offending series carried as evidence


def recent_reports(conn: Connection, run_id: str, rank: int, series: tuple[str, str, str]) -> list[dict[str, Any]]:
    """The last few steps at which the offending statistic was reported, with every statistic of that row."""
    kind, name, stat = series
    model, table, col = (Layer, layer_stats, "layer_id") if kind == "layer" else (Param, param_stats, "param_id")
    sid = conn.scalar(select(model.id).where(model.run_id == run_id, model.name == name))
    if sid is None:
        return []
    rows = conn.execute(
        select(table)
        .where(table.c.run_id == run_id, table.c[col] == sid, table.c.rank == rank, table.c[stat].is_not(None))
        .order_by(table.c.step.desc())
        .limit(RECENT)
    ).mappings()
    return [{k: v for k, v in r.items() if k not in ("run_id", col, "rank")} for r in reversed(list(rows))]


def build(
    session: Session,
    alert: AlertRow,
    status: str,
    obs: Obs | None,
    notify: Notify,
    key: str,
    layers: list[str] | None = None,
) -> dict[str, Any]:
    """The notification of one (run, rule) incident: ``alert`` is the one that leads it (its id and episode make
    the key), ``incident.layers`` every layer of the rule it speaks for."""
    if layers is None:
        layers = [alert.layer_key] if alert.layer_key else []
    run_row = session.get(Run, alert.run_id)
    conn = session.connection()
    evidence: dict[str, Any] = {"recent": [], "nonfinite_origin": run_row.nonfinite_origin if run_row else None}
    if obs is not None and obs.series is not None:
        evidence["recent"] = recent_reports(conn, alert.run_id, alert.rank, obs.series)
        evidence["series"] = {"kind": obs.series[0], "name": obs.series[1], "stat": obs.series[2]}
    links: dict[str, str] = {}
    if notify.public_url:
        links["alert"] = f"{notify.public_url.rstrip('/')}/api/v1/alerts/{alert.id}"
        links["run"] = f"{notify.public_url.rstrip('/')}/api/v1/runs/{alert.run_id}"
        links["health_map"] = f"{notify.public_url.rstrip('/')}/api/v1/runs/{alert.run_id}/health_map"
    if notify.mlflow_ui_url and run_row is not None and run_row.mlflow_run_id:
        links["mlflow"] = f"{notify.mlflow_ui_url.rstrip('/')}/#/runs/{run_row.mlflow_run_id}"
    return finite_json(
        {
            "version": 1,
            "key": key,
            "status": status,
            "alert": alert_dict(alert),
            "run": {
                "id": alert.run_id,
                "name": run_row.name if run_row else None,
                "key": run_row.key if run_row else None,
                "project": alert.project,
                "rank": alert.rank,
                "mlflow_run_id": run_row.mlflow_run_id if run_row else None,
            },
            "evidence": evidence,
            "links": links,
            "incident": {"rule": alert.rule, "layers": layers},
        }
    )


def text(p: dict[str, Any]) -> str:
    """A few readable lines (Slack, email body)."""
    a, run = p["alert"], p["run"]
    icon = {"critical": ":rotating_light:", "warning": ":warning:"}.get(a["severity"], ":information_source:")
    head = "RESOLVED" if p["status"] == "resolved" else a["severity"].upper()
    lines = [
        f"{icon} [{head}] {a['rule']} in run {run['name'] or run['id']} (project {run['project']}, rank {run['rank']})",
        a["message"],
        f"layer: {a['layer'] or '-'}  step: {a['step']}  value: {a['value']}  threshold: {a['threshold']}",
    ]
    layers = p.get("incident", {}).get("layers") or []
    if len(layers) > 1 or (layers and layers[0] != a["layer"]):
        shown = ", ".join(layers[:20]) + (f", ... ({len(layers) - 20} more)" if len(layers) > 20 else "")
        lines.append(f"{len(layers)} layers: {shown}")
    origin = p["evidence"].get("nonfinite_origin")
    if origin:
        lines.append(
            f"first NaN/Inf: step {origin.get('step')}, {origin.get('pass')} pass, layer {origin.get('layer')}"
        )
    for r in p["evidence"].get("recent", []):
        stats = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if v is not None)
        lines.append(f"  {stats}")
    lines += [f"{k}: {v}" for k, v in p.get("links", {}).items()]
    return "\n".join(lines)
