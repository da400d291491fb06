"""Alert rules: definitions (``spec``), per-step evaluation (``evaluate``), the alert lifecycle
(``lifecycle``), and their wiring into ingest and the scheduler (``service``)."""

from __future__ import annotations

from typing import Any


def install(state: Any) -> None:
    """Register alerting on a collector's state: ingest and schedule hooks, sender start/stop."""
    from layerwatch_server.rules.config import load_alerting
    from layerwatch_server.rules.service import Alerting

    alerting = Alerting(state.engine, load_alerting(state.settings.rules_file))
    state.extras["alerting"] = alerting
    alerting.attach(state.ingestor)  # evaluated inside each batch's transaction; on_ingest finishes after it
    state.extras.setdefault("ingest_hooks", []).append(alerting.on_ingest)
    state.extras.setdefault("rule_hooks", []).append(alerting.tick)
    state.extras.setdefault("startup", []).append(alerting.sender.start)
    state.extras.setdefault("shutdown", []).append(alerting.sender.stop)
