"""The rules' part of the alerting file: global rule settings and per-project overrides.

rules:                      # global: built-in overrides and user rules, by name
  dead_units: {threshold: 0.4, for: 2}
  big_grads: {stat: grad_norm, op: ">", threshold: 100, for: 3, layer: "encoder.*", severity: critical}
projects:                   # per-project overrides, same shape as `rules`
  nlp: {loss_plateau: {enabled: true}}

The file's other sections (channels, routes, notify) are notify's (``notify.config``); ``api.alerting`` reads
the whole file.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from layerwatch_server.rules.spec import RuleError, parse_rule


class RulesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: dict[str, dict[str, Any]] = {}
    projects: dict[str, dict[str, dict[str, Any]]] = {}

    def check(self) -> None:
        """Validate every rule and override, so a typo stops start-up with the field named (:class:`RuleError`)."""
        for name, fields in self.rules.items():
            parse_rule(name, fields)
        for project, rules in self.projects.items():
            for name, fields in rules.items():
                try:
                    parse_rule(name, {**self.rules.get(name, {}), **fields})
                except RuleError as exc:
                    raise RuleError(f"projects.{project}.{exc}") from None
