"""Alerting wired together: the alerting file read whole, the rules given notify's outbox as their way out.

The rules (``rules.service.Alerting``) say which alerts changed; notify (``notify.outbox``, ``notify.sender``)
decides who hears of it. Neither imports the other: this module hands the rules an ``emit`` that queues
outbox rows and a ``deliver`` that gives them to the sender after the commit.

The file (``rules_file`` setting, YAML) has both parts:

rules:                      # global: built-in overrides and user rules, by name (rules.config)
  dead_units: {threshold: 0.4, for: 2}
  big_grads: {stat: grad_norm, op: ">", threshold: 100, for: 3, layer: "encoder.*", severity: critical}
projects:                   # per-project overrides, same shape as `rules`
  nlp: {loss_plateau: {enabled: true}}
channels:                   # notify.config from here on
  ops: {type: webhook, url: "http://hooks.local/lw"}
  chat: {type: slack, url: "https://hooks.slack.com/services/..."}
  am: {type: alertmanager, url: "http://127.0.0.1:9093"}
  mail: {type: email, host: smtp.local, port: 25, sender: lw@local, to: [oncall@local]}
routes:                     # every matching route's channels get the notification
  - {channels: [am, mail], severities: [critical]}
  - {channels: [chat], projects: ["nlp*"]}
notify: {renotify_s: 14400, max_backoff_s: 60, mlflow_ui_url: "http://mlflow:5000"}
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from layerwatch_server.notify.config import NotifyConfig
from layerwatch_server.notify.outbox import enqueue
from layerwatch_server.notify.sender import Sender
from layerwatch_server.rules.config import RulesConfig
from layerwatch_server.rules.service import Alerting, Clock
from layerwatch_server.rules.spec import RuleError
from layerwatch_server.storage.alerts import Obs
from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.models import AlertRow


class AlertingConfig(RulesConfig, NotifyConfig):
    """The whole alerting file: the rules' sections and notify's."""

    model_config = ConfigDict(extra="forbid")


def load_alerting(path: str | Path | None) -> AlertingConfig:
    """Read and validate the file; every rule is checked so a typo stops start-up with the field named."""
    if path is None:
        return AlertingConfig()
    p = Path(path)
    if not p.is_file():
        raise RuleError(f"rules file {p} does not exist")
    return parse_alerting(yaml.safe_load(p.read_text()) or {})


def parse_alerting(data: dict[str, Any]) -> AlertingConfig:
    try:
        cfg = AlertingConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where, msg = ".".join(str(x) for x in err["loc"]), err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and ": " in msg:  # a cross-field check names its field first
            field, _, msg = msg.partition(": ")
            where = f"{where}.{field}"
        raise RuleError(f"{where}: {msg}") from None
    cfg.check()
    unknown = cfg.unknown_channel()
    if unknown is not None:
        raise RuleError(unknown)
    return cfg


def make_alerting(
    engine: Engine, cfg: AlertingConfig, *, clock: Clock = utcnow, sender: Sender | None = None
) -> Alerting:
    """The rules of ``cfg``, notifying through its channels: queued in the alert's transaction, handed to
    ``sender`` (a new one, not started, when None) after the commit."""
    sender = sender or Sender(engine, lambda: cfg)

    def emit(
        session: Session,
        alert: AlertRow,
        status: str,
        obs: Obs | None,
        now: dt.datetime,
        *,
        tag: str = "",
        layers: list[str] | None = None,
    ) -> list[Any]:
        return enqueue(session, cfg, alert, status, obs, now, tag=tag, layers=layers)

    return Alerting(
        engine,
        cfg,
        emit=emit,
        deliver=sender.hand,
        renotify_s=cfg.notify.renotify_s,
        resolved_visible_s=cfg.notify.resolved_visible_s,
        clock=clock,
    )
