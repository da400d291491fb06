"""The latest value of each statistic per run and layer, kept in memory and yielded at scrape time.

Ingest pays only for the last step of each batch (and, for statistics measured now and then such as
``dead_frac``, the last step that has them), and only for rank 0: every rank reports the same layers.
A statistic may be null for some layers of a step and measured for others (a Linear whose units the ReLU
after it reports has no ``dead_frac`` of its own), so "measured at a step" means "measured for some layer".
Cardinality is bounded: at most ``max_layers`` layers and parameters per run (model order, optionally
filtered by ``layer_regex``), a few statistics each, and a run's series disappear ``ended_s`` after
it ended or ``stale_s`` after it last reported.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from layerwatch import wire
from layerwatch_server.core.batch import Batch
from layerwatch_server.core.layers import dead_judged

RUN_LABELS = ["project", "run"]
_STEP_STATS = wire.STEP_STATS


@dataclass
class _Run:
    project: str
    name: str
    status: str = "running"
    last_seen: float = 0.0
    ended_at: float | None = None
    step: int | None = None
    step_stats: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> stat -> value
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    agg: dict[str, float] = field(default_factory=dict)
    alerts: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (rule, severity, state) -> n
    selected: dict[str, bool] = field(default_factory=dict)  # name -> exposed? (decided once per name)
    exposed: int = 0  # how many of ``selected`` are (counted, not summed per name: a run may have 20,000)


class LatestSnapshot(Collector):
    """Register on a registry; call :meth:`update` after each committed batch (an ingest hook)."""

    def __init__(
        self,
        layer_stats: tuple[str, ...] = ("dead_frac",),
        param_stats: tuple[str, ...] = (),
        *,
        max_layers: int = 16,
        layer_regex: str = "",
        stale_s: float = 900.0,
        ended_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.layer_stats, self.param_stats = layer_stats, param_stats
        self.max_layers, self.stale_s, self.ended_s, self.clock = max_layers, stale_s, ended_s, clock
        self._regex = re.compile(layer_regex) if layer_regex else None
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    # ---- ingest side -------------------------------------------------------------------------
    def update(self, batch: Batch, run_id: str) -> None:
        now = self.clock()
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                run = self._runs[run_id] = _Run(batch.run.project, batch.run.name or batch.run.key)
            run.last_seen = now
            if batch.end is not None:
                run.status, run.ended_at = batch.end.status, now
            if batch.rank != 0 or not batch.steps:
                return
            last = max(batch.steps, key=lambda s: s.step)
            if run.step is not None and last.step < run.step:
                return  # a late (spooled) batch: older than what is shown
            run.step = last.step
            for stat in _STEP_STATS:
                v = getattr(last, stat)
                if v is not None:
                    run.step_stats[stat] = v
            self._series(run, batch, "layers", batch.layer_stats, self.layer_stats, run.layers)
            self._series(run, batch, "params", batch.param_stats, self.param_stats, run.params)
            self._aggregates(run, batch)

    def _pick(self, run: _Run, name: str) -> bool:
        hit = run.selected.get(name)
        if hit is None:
            hit = run.exposed < self.max_layers and (self._regex is None or bool(self._regex.search(name)))
            run.selected[name] = hit
            run.exposed += hit
        return hit

    def _series(
        self, run: _Run, batch: Batch, attr: str, order: list[str], wanted: tuple[str, ...], out: dict[str, Any]
    ) -> None:
        defs = sorted(getattr(batch, attr), key=lambda d: d.index)
        names = {d.index: d.name for d in defs if self._pick(run, d.name)}
        if not names:
            return
        for stat in wanted:
            if stat not in order:
                continue
            col = order.index(stat) + 1
            rows = _latest_rows(batch, attr, col)
            for row in rows:
                name = names.get(int(row[0]))
                if name is not None and row[col] is not None:
                    out.setdefault(name, {})[stat] = row[col]

    def _aggregates(self, run: _Run, batch: Batch) -> None:
        # Dead units as the dead_units rule reads them: not an output head's outputs that are never positive.
        judged = dead_judged((d.index, d.name, d.type) for d in batch.layers)
        units = {d.index: d.units for d in batch.layers if d.name in judged}
        if "dead_frac" in batch.layer_stats:
            col = batch.layer_stats.index("dead_frac") + 1
            rows = _latest_rows(batch, "layers", col)
            dead = [(r[col], units[int(r[0])]) for r in rows if r[col] is not None and int(r[0]) in units]
            if dead:
                run.agg["dead_frac_max"] = max(d for d, _ in dead)
                total = sum(u for _, u in dead)
                if total:
                    run.agg["dead_units_frac"] = sum(d * u for d, u in dead) / total
        if "grad_norm" in batch.param_stats:
            col = batch.param_stats.index("grad_norm") + 1
            grads = [r[col] for r in _latest_rows(batch, "params", col) if r[col] is not None]
            if grads:
                run.agg["grad_norm_max"] = max(grads)
        n = 0.0
        for attr, order, stat in (
            ("layers", batch.layer_stats, "nonfinite"),
            ("params", batch.param_stats, "grad_nonfinite"),
        ):
            if stat in order:
                col = order.index(stat) + 1
                n += sum(r[col] for r in _latest_rows(batch, attr, col) if r[col] is not None)
        run.agg["nonfinite_count"] = n

    def set_alerts(self, run_id: str, alerts: list[Mapping[str, Any]]) -> None:
        """The run's current alerts (dicts with rule, severity, state), for ``layerwatch_alerts``."""
        counts: dict[tuple[str, str, str], int] = {}
        for a in alerts:
            key = (str(a.get("rule")), str(a.get("severity")), str(a.get("state")))
            counts[key] = counts.get(key, 0) + 1
        with self._lock:
            if run_id in self._runs:
                self._runs[run_id].alerts = counts

    # ---- scrape side -------------------------------------------------------------------------
    def _live(self) -> list[tuple[str, _Run]]:
        now = self.clock()
        with self._lock:
            for run_id, run in list(self._runs.items()):
                ended = run.ended_at is not None and now - run.ended_at > self.ended_s
                if ended or now - run.last_seen > self.stale_s:
                    del self._runs[run_id]
            return list(self._runs.items())

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: families vary with the snapshot

    def collect(self) -> Iterator[Metric]:
        runs = self._live()
        info = GaugeMetricFamily(
            "layerwatch_run_info", "A run being watched (value 1).", labels=[*RUN_LABELS, "name", "status"]
        )
        step = GaugeMetricFamily("layerwatch_run_step", "Last step reported by rank 0.", labels=RUN_LABELS)
        seen = GaugeMetricFamily(
            "layerwatch_run_last_seen_timestamp_seconds", "Last batch received.", labels=RUN_LABELS
        )
        steps = {
            s: GaugeMetricFamily(f"layerwatch_run_{s}", f"Latest {s} (rank 0).", labels=RUN_LABELS) for s in _STEP_STATS
        }
        aggs = {a: GaugeMetricFamily(f"layerwatch_run_{a}", _AGG_HELP[a], labels=RUN_LABELS) for a in _AGG_HELP}
        layer = {
            s: GaugeMetricFamily(f"layerwatch_layer_{s}", f"Latest {s} per layer.", labels=[*RUN_LABELS, "layer"])
            for s in self.layer_stats
        }
        param = {
            s: GaugeMetricFamily(f"layerwatch_param_{s}", f"Latest {s} per parameter.", labels=[*RUN_LABELS, "param"])
            for s in self.param_stats
        }
        alerts = GaugeMetricFamily(
            "layerwatch_alerts",
            "Alerts of the run by rule and state.",
            labels=[*RUN_LABELS, "rule", "severity", "state"],
        )
        for run_id, run in runs:
            base = [run.project, run_id]
            info.add_metric([*base, run.name, run.status], 1)
            seen.add_metric(base, run.last_seen)
            if run.step is not None:
                step.add_metric(base, run.step)
            for s, v in run.step_stats.items():
                steps[s].add_metric(base, v)
            for a, v in run.agg.items():
                aggs[a].add_metric(base, v)
            for name, values in run.layers.items():
                for s, v in values.items():
                    layer[s].add_metric([*base, name], v)
            for name, values in run.params.items():
                for s, v in values.items():
                    param[s].add_metric([*base, name], v)
            for (rule, severity, state), n in run.alerts.items():
                alerts.add_metric([*base, rule, severity, state], n)
        yield from (info, step, seen, *steps.values(), *aggs.values(), *layer.values(), *param.values(), alerts)
        yield GaugeMetricFamily("layerwatch_snapshot_runs", "Runs held for /metrics.", value=len(runs))


_AGG_HELP = {
    "dead_frac_max": "The worst layer's dead fraction at the last dead-unit window (as the dead_units rule "
    "reads it: not an output head's).",
    "dead_units_frac": "Dead units / units over every layer the dead_units rule judges.",
    "grad_norm_max": "The largest per-parameter gradient norm.",
    "nonfinite_count": "Non-finite activations and gradients counted at the last step.",
}


def _latest_rows(batch: Batch, attr: str, col: int) -> list[list[float | None]]:
    """Rows of the last step where column ``col`` was measured for some row (sparse stats are null in between,
    and null for some layers even at the steps that measure them)."""
    for s in sorted(batch.steps, key=lambda s: s.step, reverse=True):
        rows = getattr(s, attr)
        if any(row[col] is not None for row in rows):
            return rows
    return []
