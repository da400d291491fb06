"""Rule definitions as data: built-in defaults < rules file < API < per-project < per-run overrides.

A rule is one flat pydantic model so an invalid field is refused with its name. Built-in rules are on by
default; any of them can be tuned or disabled (``enabled: false``) at each level.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Severity = Literal["info", "warning", "critical"]
Op = Literal[">", ">=", "<", "<=", "==", "!="]
BUILTIN_KINDS = (
    "non_finite",
    "dead_units",
    "loss_spike",
    "exploding_gradients",
    "vanishing_gradients",
    "saturation",
    "loss_plateau",
    "stalled",
)

# Tuned so healthy runs stay quiet (see tests/scenarios); the "why" of each number is in docs/alerts.md.
BUILTINS: dict[str, dict[str, Any]] = {
    "non_finite": {"severity": "critical", "for": 1},
    "dead_units": {"threshold": 0.5, "run_threshold": 0.5, "for": 2},
    "loss_spike": {
        "threshold": 10.0,
        "rise": 6.0,
        "window": 100,
        "warmup": 20,
        "min_rel": 0.5,
        "factor": 100.0,
        "for": 1,
        "clear": 10,
    },
    "exploding_gradients": {"threshold": 1e4, "ratio": 1e3, "factor": 100.0, "window": 100, "for": 1, "clear": 10},
    "vanishing_gradients": {"threshold": 1e-8, "ratio": 1e-3, "loss_floor": 1e-4, "for": 2},
    "saturation": {"threshold": 0.5, "for": 2},
    "loss_plateau": {
        "enabled": False,
        "severity": "info",
        "patience": 300,
        "window": 10,
        "min_delta": 0.01,
        "threshold": 2.0,
        "loss_floor": 1e-4,
        "for": 1,
    },
    "stalled": {"severity": "critical", "threshold": 300.0},
}


class RuleError(ValueError):
    """An invalid rule; the message names the field."""


class Rule(BaseModel):
    """One rule. ``kind`` is a built-in name or ``threshold`` (a user rule on any statistic)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: Literal[(*BUILTIN_KINDS, "threshold")] = "threshold"  # type: ignore[valid-type]
    enabled: bool = True
    severity: Severity = "warning"
    for_: int = Field(1, ge=1, le=10_000, alias="for", description="consecutive reports before firing")
    clear: int = Field(1, ge=1, le=10_000, description="consecutive clean reports before a firing alert resolves")
    threshold: float | None = None
    project: str | None = Field(None, description="only runs of this project (API/file rules)")
    # threshold rules
    stat: str | None = Field(None, description="step, layer or parameter statistic, or a user scalar")
    op: Op = ">"
    layer: str | None = Field(None, description="fnmatch pattern on the layer (or parameter) name")
    # built-in parameters (ignored by kinds that do not use them)
    run_threshold: float | None = Field(None, ge=0, le=1)
    window: int | None = Field(None, ge=2, le=1000)
    warmup: int | None = Field(None, ge=1, le=100_000)
    min_rel: float | None = Field(None, ge=0)
    ratio: float | None = Field(None, gt=0)
    factor: float | None = Field(None, gt=1, description="a multiple of the run's own typical value")
    rise: float | None = Field(
        None, gt=0, description="loss_spike: the decision interval of the CUSUM of the loss's rank scores"
    )
    loss_floor: float | None = Field(None, ge=0)
    patience: int | None = Field(None, ge=1)
    min_delta: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> Rule:
        if self.kind == "threshold":
            if self.stat is None:
                raise ValueError("stat: a threshold rule needs the statistic to watch")
            if self.threshold is None:
                raise ValueError("threshold: a threshold rule needs a threshold")
        if self.threshold is not None and self.threshold != self.threshold:
            raise ValueError("threshold: must be a number, not NaN")
        return self

    def matches_layer(self, name: str) -> bool:
        return self.layer is None or fnmatch.fnmatchcase(name, self.layer)


def builtin_setting(rule: Rule, field: str) -> Any:
    """A parameter of a built-in kind: the rule's own, else the kind's default in :data:`BUILTINS` (for a rule of
    that kind under another name, or one whose field was set to null)."""
    value = getattr(rule, field)
    return BUILTINS[rule.kind][field] if value is None else value


def parse_rule(name: str, data: dict[str, Any]) -> Rule:
    """Validate ``data`` as rule ``name``; built-in names inherit their defaults. Raises :class:`RuleError`."""
    if not isinstance(data, dict):
        raise RuleError(f"rules.{name}: must be a mapping of fields")
    merged = {**BUILTINS.get(name, {}), **data, "name": name}
    merged.setdefault("kind", name if name in BUILTINS else "threshold")
    try:
        return Rule.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        field, msg = ".".join(str(p) for p in err["loc"]), err["msg"]
        if not field:  # a cross-field check: its message starts with the field it is about
            field, _, msg = msg.removeprefix("Value error, ").partition(": ")
        raise RuleError(f"rules.{name}.{field}: {msg}") from None


def merge(layers: list[dict[str, dict[str, Any]]], project: str) -> dict[str, Rule]:
    """The effective rules: each layer (a {name: fields} map) overrides the previous one field by field.

    Invalid combinations at run level are dropped back to the previous level instead of raising: a bad
    per-run override must not stop the other rules.
    """
    fields: dict[str, dict[str, Any]] = {name: {} for name in BUILTINS}
    rules: dict[str, Rule] = {}
    for name in BUILTINS:
        rules[name] = parse_rule(name, {})
    for level in layers:
        for name, data in (level or {}).items():
            if not isinstance(data, dict):
                continue
            candidate = {**fields.get(name, {}), **data}
            try:
                rule = parse_rule(name, candidate)
            except RuleError:
                continue
            fields[name], rules[name] = candidate, rule
    return {n: r for n, r in rules.items() if r.enabled and (r.project is None or r.project == project)}
