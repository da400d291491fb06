"""The alerting file (``rules_file`` setting, YAML): rules, per-project overrides, channels, routes.

rules:                      # global: built-in overrides and user rules, by name
  dead_units: {threshold: 0.4, for: 2}
  big_grads: {stat: grad_norm, op: ">", threshold: 100, for: 3, layer: "encoder.*", severity: critical}
projects:                   # per-project overrides, same shape as `rules`
  nlp: {loss_plateau: {enabled: true}}
channels:
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

import fnmatch
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layerwatch_server.rules.spec import RuleError, parse_rule


class Channel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["webhook", "slack", "alertmanager", "email"]
    url: str | None = None  # webhook, slack, alertmanager (base URL)
    headers: dict[str, str] = {}
    timeout_s: float = Field(5.0, gt=0)
    host: str | None = None  # email
    port: int = 25
    sender: str = "layerwatch@localhost"
    to: list[str] = []
    starttls: bool = False
    username: str | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> Channel:
        if self.type == "email":
            if not self.host:
                raise ValueError("host: an email channel needs the SMTP server's host")
            if not self.to:
                raise ValueError("to: an email channel needs at least one recipient")
        elif not self.url:
            raise ValueError(f"url: a {self.type} channel needs a url")
        return self


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: list[str]
    projects: list[str] = ["*"]  # fnmatch patterns
    severities: list[Literal["info", "warning", "critical"]] = ["info", "warning", "critical"]


class Notify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    renotify_s: float = Field(4 * 3600.0, gt=0, description="re-send a still-firing alert this often")
    max_backoff_s: float = Field(60.0, gt=0, description="longest wait between delivery retries")
    give_up_s: float = Field(24 * 3600.0, gt=0, description="mark failed after retrying this long")
    mlflow_ui_url: str | None = None
    public_url: str | None = Field(None, description="this collector's URL, for links in notifications")
    resolved_visible_s: float = Field(600.0, ge=0, description="resolved alerts stay in ingest responses")


class AlertingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: dict[str, dict[str, Any]] = {}
    projects: dict[str, dict[str, dict[str, Any]]] = {}
    channels: dict[str, Channel] = {}
    routes: list[Route] = []
    notify: Notify = Notify()

    def channels_for(self, project: str, severity: str) -> list[str]:
        """Channel names for an alert; with no routes, every channel gets everything."""
        if not self.routes:
            return sorted(self.channels)
        names: list[str] = []
        for route in self.routes:
            if severity in route.severities and any(fnmatch.fnmatchcase(project, p) for p in route.projects):
                names += [c for c in route.channels if c not in names]
        return names


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
    for name, fields in cfg.rules.items():
        parse_rule(name, fields)
    for project, rules in cfg.projects.items():
        for name, fields in rules.items():
            try:
                parse_rule(name, {**cfg.rules.get(name, {}), **fields})
            except RuleError as exc:
                raise RuleError(f"projects.{project}.{exc}") from None
    for i, route in enumerate(cfg.routes):
        for c in route.channels:
            if c not in cfg.channels:
                raise RuleError(f"routes[{i}].channels: unknown channel {c!r}; define it under channels")
    return cfg
