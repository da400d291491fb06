"""The rule book: which rules apply where. Three levels merged over the built-ins, the rules file (and its
per-project overrides), the rules set through the API, and a run's own overrides; the API's rules are
stored in ``rule_defs`` and re-read at most every ``cache_s`` (other replicas may change them)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from sqlalchemy import Engine, delete, select

from layerwatch_server.rules.config import RulesConfig
from layerwatch_server.rules.spec import BUILTINS, Rule, RuleError, merge, parse_rule
from layerwatch_server.storage.base import LRU, utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import RuleDef


class RuleExists(RuleError):
    """A rule of that name was already set through the API (create it once, then change it)."""


def run_overrides(config: dict[str, Any] | None) -> dict[str, Any]:
    """Per-run rule overrides the client sent (``watch(..., rules={...})``)."""
    config = config or {}
    rules = (config.get("hparams") or {}).get("rules") or config.get("rules") or {}
    return rules if isinstance(rules, dict) else {}


class RuleBook:
    def __init__(self, engine: Engine, cfg: RulesConfig, *, cache_s: float = 2.0) -> None:
        self.engine, self.cfg, self.cache_s = engine, cfg, cache_s
        self._db_rules: tuple[float, dict[str, dict[str, Any]]] = (-1e18, {})
        self._merged = LRU(256)  # (project, overrides) -> (config, API rules, merged rules)
        self._lock = threading.Lock()

    def db_rules(self) -> dict[str, dict[str, Any]]:
        """Rules set through the API, re-read at most every ``cache_s``."""
        at, rules = self._db_rules
        if time.monotonic() - at > self.cache_s:
            with self.engine.connect() as conn:
                rules = {n: s for n, s in conn.execute(select(RuleDef.name, RuleDef.spec))}
            self._db_rules = (time.monotonic(), rules)
        return rules

    def invalidate(self) -> None:
        self._db_rules = (-1e18, {})

    def rules_for(self, project: str, run_config: dict[str, Any] | None) -> dict[str, Rule]:
        """The effective rules of a run. Merged (every rule validated) once per project, run overrides, rules
        file and re-read of the API rules, not per batch; the result is shared: read it, do not change it."""
        cfg, db, overrides = self.cfg, self.db_rules(), run_overrides(run_config)
        key = (project, json.dumps(overrides, sort_keys=True, default=str))
        with self._lock:
            hit = self._merged.get(key)
        if hit is not None and hit[0] is cfg and hit[1] is db:
            return hit[2]
        rules = merge([cfg.rules, db, cfg.projects.get(project, {}), overrides], project)
        with self._lock:
            self._merged.put(key, (cfg, db, rules))
        return rules

    def listing(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every global rule (or a project's), built-ins included, with where its settings come from
        (``source``: api, file or builtin); a rule the levels make invalid is listed with its ``error``."""
        self.invalidate()
        levels = [self.cfg.rules, self.db_rules(), self.cfg.projects.get(project or "", {})]
        names = sorted({*BUILTINS, *(n for lvl in levels for n in lvl)})
        out = []
        for name in names:
            fields: dict[str, Any] = {}
            for lvl in levels:
                fields.update(lvl.get(name, {}))
            try:
                rule = parse_rule(name, fields)
            except RuleError as exc:
                out.append({"name": name, "error": str(exc)})
                continue
            src = "api" if name in levels[1] else "file" if name in levels[0] else "builtin"
            out.append({**rule.model_dump(by_alias=True, exclude_none=True), "source": src})
        return out

    def save(self, name: str, spec: dict[str, Any], *, create: bool) -> Rule:
        """Set rule ``name`` through the API (``create``: only if it is not set yet, else :class:`RuleExists`).
        Raises :class:`RuleError` naming the field when ``spec`` is not a valid rule; nothing is written then."""
        spec = {k: v for k, v in spec.items() if k != "name"}
        rule = parse_rule(name, spec)
        with writer(self.engine).begin() as conn:
            exists = conn.scalar(select(RuleDef.name).where(RuleDef.name == name)) is not None
            if create and exists:
                raise RuleExists(f"rule {name!r} exists; PUT /api/v1/rules/{name} to change it")
            table = RuleDef.__table__
            if exists:
                conn.execute(table.update().where(RuleDef.name == name).values(spec=spec, updated_at=utcnow()))
            else:
                conn.execute(table.insert().values(name=name, spec=spec, updated_at=utcnow()))
        self.invalidate()
        return rule

    def drop(self, name: str) -> bool:
        """Forget the API's definition of ``name`` (a built-in or file rule falls back); False if there was none."""
        with writer(self.engine).begin() as conn:
            gone = conn.execute(delete(RuleDef).where(RuleDef.name == name)).rowcount
        self.invalidate()
        return bool(gone)
