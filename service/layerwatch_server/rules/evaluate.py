"""Per-step rule evaluation: pure functions of one step (plus a small per-run memory) -> observations.

An observation says, for one (rule, layer), whether the condition holds at this step, with the value and
threshold as evidence. A statistic that is not reported at a step (``dead_frac`` between windows) yields
no observation, so "for N consecutive reports" counts reports, not steps. The lifecycle turns
observations into alert states.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from layerwatch import wire
from layerwatch_server.core.batch import Batch, StepIn
from layerwatch_server.rules.spec import Rule

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


@dataclass
class Obs:
    rule: str
    layer: str  # "" for run-level
    breach: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""
    series: tuple[str, str, str] | None = None  # ("layer"|"param", name, stat) for evidence


@dataclass
class StepView:
    """One step with names resolved: layers[name] = (kind, units, {stat: value}), params likewise."""

    step: int
    loss: float | None
    grad_norm_total: float | None
    scalars: dict[str, float]
    layers: dict[str, tuple[str, int, dict[str, float | None]]] = field(default_factory=dict)
    params: dict[str, tuple[list[int], dict[str, float | None]]] = field(default_factory=dict)
    lr: float | None = None
    # Layers whose dead_frac means something on its own (see ``dead_judged``); None: all of them.
    dead_judged: set[str] | None = None


def view(batch: Batch, s: StepIn, detailed: bool = True) -> StepView:
    """One step with names resolved; ``detailed=False`` leaves out layers and parameters (only the step's own
    statistics are needed for a step that is neither a report nor non-finite anywhere)."""
    v = StepView(s.step, s.loss, s.grad_norm_total, s.scalars, lr=s.lr)
    if not detailed:
        return v
    lmeta = {d.index: d for d in batch.layers}
    pmeta = {d.index: d for d in batch.params}
    for row in s.layers:
        d = lmeta[int(row[0])]
        v.layers[d.name] = (d.kind, d.units, dict(zip(batch.layer_stats, row[1:], strict=True)))
    for row in s.params:
        p = pmeta[int(row[0])]
        v.params[p.name] = (p.shape, dict(zip(batch.param_stats, row[1:], strict=True)))
    v.dead_judged = dead_judged((d.index, d.name, d.type) for d in batch.layers)
    return v


PRE_ACTIVATIONS = frozenset(
    {"Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"}
)


def dead_judged(layers: Iterable[tuple[int, str, str]]) -> set[str]:
    """Names of the layers, given as (index, name, type), whose dead_frac is a finding of its own. A Linear/Conv
    output counts as dead when never positive only because a functional ``F.relu`` may follow it: when the next
    watched layer (in execution order) is an activation module, that module reports the same units itself (or,
    for tanh/GELU..., "never positive" is no death at all); the model's last layer is an output head, whose
    outputs may well all be negative."""
    ordered = sorted(layers)
    judged = set()
    for i, (_, name, type_) in enumerate(ordered):
        if type_ not in PRE_ACTIVATIONS:
            judged.add(name)
        elif i + 1 < len(ordered) and ordered[i + 1][2] in PRE_ACTIVATIONS:
            judged.add(name)  # followed by no activation module: a functional one, if any, sits in between
    return judged


def needs_detail(batch: Batch, s: StepIn) -> tuple[bool, bool]:
    """(is a report step's layer data present, is anything non-finite) from the raw rows, without building
    dicts: a dead-unit window ends here, or a NaN/Inf is anywhere in the step. Columns are scanned in C (this
    runs for every step of every batch); a false "non-finite" only costs a detailed view, never an alert."""
    dead = _column(s.layers, batch.layer_stats, "dead_frac")
    window_end = dead is not None and dead.count(None) < len(dead)
    if _bad(s.loss) or _bad(s.grad_norm_total):
        return window_end, True
    counts = _column(s.layers, batch.layer_stats, "nonfinite")
    if counts is not None and any(map(_ZERO.__lt__, filter(None, counts))):  # a count > 0 (NaN is none)
        return window_end, True
    return window_end, _any_bad(_column(s.layers, batch.layer_stats, "act_max_abs")) or _any_bad(
        _column(s.params, batch.param_stats, "grad_norm")
    )


_ZERO = 0.0


def _column(rows: list[list[float | None]], stats: list[str], name: str) -> list[float | None] | None:
    """One statistic of every row (rows are [index, *stats]), or None when the batch does not carry it."""
    if name not in stats or not rows:
        return None
    return list(map(operator.itemgetter(stats.index(name) + 1), rows))


def _any_bad(values: list[float | None] | None) -> bool:
    """Whether a NaN/Inf is among the values: their sum is then NaN/Inf (so is an overflowing sum of finite
    ones, which is harmless here)."""
    return values is not None and not math.isfinite(sum(filter(None, values)))


def _bad(x: float | None) -> bool:
    return x is not None and not math.isfinite(x)


def non_finite(r: Rule, v: StepView, origin: dict[str, Any] | None) -> list[Obs]:
    where = [n for n, (_, _, st) in v.layers.items() if (st.get("nonfinite") or 0) > 0 or _bad(st.get("act_max_abs"))]
    where += [n for n, (_, st) in v.params.items() if _bad(st.get("grad_norm"))]
    bad = _bad(v.loss) or _bad(v.grad_norm_total) or bool(where)
    msg = ""
    if bad:
        first = (
            f"; first at step {origin['step']} ({origin.get('pass')}, layer {origin.get('layer')})" if origin else ""
        )
        what = "loss" if _bad(v.loss) else (where[0] if where else "gradient norm")
        msg = f"NaN/Inf at step {v.step} in {what} ({len(where)} layers/params affected){first}"
    return [Obs(r.name, "", bad, v.loss if _bad(v.loss) else float(len(where)), 0.0, msg)]


def dead_units(r: Rule, v: StepView) -> list[Obs]:
    out, dead, total = [], 0.0, 0
    for name, (kind, units, st) in v.layers.items():
        df = st.get("dead_frac")
        if df is None or not r.matches_layer(name) or (v.dead_judged is not None and name not in v.dead_judged):
            continue
        if (st.get("nonfinite") or 0) > 0 or _bad(st.get("act_max_abs")):
            continue  # NaN is never "active": after a NaN every unit reads dead, which non_finite already says
        out.append(
            Obs(
                r.name,
                name,
                df > r.threshold,
                df,
                r.threshold,
                f"layer {name}: {df:.0%} of its {units} units dead (threshold {r.threshold:.0%})",
                ("layer", name, "dead_frac"),
            )
        )
        if kind == wire.KIND_RELU and math.isfinite(df):
            dead, total = dead + df * units, total + units
    if total and r.run_threshold is not None:
        share = dead / total
        out.append(
            Obs(
                r.name,
                "",
                share > r.run_threshold,
                share,
                r.run_threshold,
                f"{share:.0%} of all {total} ReLU-family units dead",
            )
        )
    return out


def saturation(r: Rule, v: StepView) -> list[Obs]:
    out = []
    for name, (kind, _, st) in v.layers.items():
        sf = st.get("sat_frac")
        if sf is None or kind != wire.KIND_BOUNDED or not r.matches_layer(name):
            continue
        msg = f"layer {name}: {sf:.0%} of outputs saturated (threshold {r.threshold:.0%})"
        out.append(Obs(r.name, name, sf > r.threshold, sf, r.threshold, msg, ("layer", name, "sat_frac")))
    return out


def _weights(v: StepView) -> list[tuple[str, float]]:
    """(module name, grad norm) of matrix-shaped parameters in model order, where reported and finite."""
    return [
        (name.rsplit(".", 1)[0], st["grad_norm"])
        for name, (shape, st) in v.params.items()
        if len(shape) >= 2 and st.get("grad_norm") is not None and math.isfinite(st["grad_norm"])
    ]


def gradients(r: Rule, v: StepView, exploding: bool) -> list[Obs]:
    out = []
    lively = v.loss is None or not math.isfinite(v.loss) or v.loss > (r.loss_floor or 0.0)
    weights = _weights(v)
    for module, g in weights:
        if not r.matches_layer(module):
            continue
        breach = g > r.threshold if exploding else (g < r.threshold and lively)
        word = "above" if exploding else "below"
        msg = f"layer {module}: gradient norm {g:.3g} {word} {r.threshold:.3g}"
        out.append(Obs(r.name, module, breach, g, r.threshold, msg, ("param", f"{module}.weight", "grad_norm")))
    if r.ratio is not None and len(weights) >= 2 and weights[-1][1] > 0:
        (first, g0), (last, g1) = weights[0], weights[-1]
        ratio = g0 / g1
        breach = ratio > r.ratio if exploding else ratio < r.ratio
        msg = f"gradient norm ratio first/last layer ({first}/{last}) = {ratio:.3g}, bound {r.ratio:.3g}"
        out.append(Obs(r.name, "", breach, ratio, r.ratio, msg))
    return out


def loss_spike(r: Rule, v: StepView, mem: dict[str, Any]) -> list[Obs]:
    if v.loss is None or not math.isfinite(v.loss):
        return []
    hist: list[float] = mem.setdefault(r.name, [])
    out = []
    if len(hist) >= (r.warmup or 1):
        med = statistics.median(hist)
        spread = 1.4826 * statistics.median(abs(x - med) for x in hist)
        limit = med + max(r.threshold * spread, (r.min_rel or 0.0) * abs(med))
        msg = f"loss {v.loss:.4g} at step {v.step} above {limit:.4g} (median {med:.4g}, robust sd {spread:.3g})"
        out.append(Obs(r.name, "", v.loss > limit, v.loss, limit, msg))
    hist.append(v.loss)
    del hist[: -(r.window or 50)]
    return out


def loss_plateau(r: Rule, v: StepView, mem: dict[str, Any]) -> list[Obs]:
    if v.loss is None or not math.isfinite(v.loss):
        return []
    p = mem.setdefault(r.name, {"recent": [], "best": None, "best_step": v.step})
    p["recent"] = [*p["recent"], v.loss][-(r.window or 10) :]
    if len(p["recent"]) < (r.window or 10):
        return []
    smooth = sum(p["recent"]) / len(p["recent"])
    if p["best"] is None or smooth < p["best"] * (1 - (r.min_delta or 0.0)):
        p["best"], p["best_step"] = smooth, v.step
    stuck = v.step - p["best_step"]
    breach = stuck >= (r.patience or 300) and smooth > (r.loss_floor or 0.0)
    msg = f"loss {smooth:.4g} has not improved on {p['best']:.4g} for {stuck} steps"
    return [Obs(r.name, "", breach, smooth, p["best"], msg)]


def threshold(r: Rule, v: StepView) -> list[Obs]:
    op, th, stat = OPS[r.op], r.threshold, r.stat
    assert stat is not None and th is not None
    rows: list[tuple[str, float | None, tuple[str, str, str] | None]] = []
    if stat in wire.LAYER_STATS:
        rows = [(n, st.get(stat), ("layer", n, stat)) for n, (_, _, st) in v.layers.items() if r.matches_layer(n)]
    elif stat in wire.PARAM_STATS:
        rows = [(n, st.get(stat), ("param", n, stat)) for n, (_, st) in v.params.items() if r.matches_layer(n)]
    else:
        step_stats = {"loss": v.loss, "lr": v.lr, "grad_norm_total": v.grad_norm_total}
        value = step_stats[stat] if stat in step_stats else v.scalars.get(stat)
        rows = [("", value, None)]
    return [
        Obs(r.name, n, bool(op(x, th)), x, th, f"{stat}{' of ' + n if n else ''} = {x:.4g} {r.op} {th:.4g}", s)
        for n, x, s in rows
        if x is not None
    ]


def evaluate_step(
    rules: dict[str, Rule], v: StepView, mem: dict[str, Any], origin: dict[str, Any] | None, report: bool = True
) -> list[Obs]:
    """Every enabled rule on one step; ``mem`` (the rank's JSON memory) is updated in place.

    ``report=False`` (a step inside a batch, not its last) judges only what must be seen at every step: NaN/Inf,
    the loss rules and thresholds on step statistics. Layer and parameter levels are judged once per report,
    which is what their ``for`` counts, and keeps evaluation off the ingest rate's critical path.
    """
    out: list[Obs] = []
    for r in rules.values():
        if r.kind == "non_finite":
            out += non_finite(r, v, origin)
        elif r.kind == "loss_spike":
            out += loss_spike(r, v, mem)
        elif r.kind == "loss_plateau":
            out += loss_plateau(r, v, mem)
        elif not report and not (r.kind == "threshold" and r.stat not in wire.LAYER_STATS + wire.PARAM_STATS):
            continue
        elif r.kind == "dead_units":
            out += dead_units(r, v)
        elif r.kind == "saturation":
            out += saturation(r, v)
        elif r.kind in ("exploding_gradients", "vanishing_gradients"):
            out += gradients(r, v, r.kind == "exploding_gradients")
        elif r.kind == "threshold":
            out += threshold(r, v)
    return out
