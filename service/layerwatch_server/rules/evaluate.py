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
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any

from layerwatch import wire
from layerwatch_server.core.batch import Batch, StepIn
from layerwatch_server.core.layers import PRE_ACTIVATIONS, dead_judged
from layerwatch_server.rules.spec import Rule, builtin_setting
from layerwatch_server.storage.alerts import Obs

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


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
    # Linear/Conv outputs among them: a functional ReLU may follow, or a residual sum (see ``dead_units``).
    pre_activations: frozenset[str] = frozenset()


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
    v.pre_activations = frozenset(d.name for d in batch.layers if d.type in PRE_ACTIVATIONS)
    return v


PRE_ACTIVATION_DEAD = 0.9  # dead_units' bar for a Linear/Conv output judged as if a functional ReLU followed


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


MIN_LOSS_SCALE = 1.0  # below it a GradScaler's overflow is a collapse (as layerwatch.tripwire judges it)


def non_finite(r: Rule, v: StepView, origin: dict[str, Any] | None) -> list[Obs]:
    where = [n for n, (_, _, st) in v.layers.items() if (st.get("nonfinite") or 0) > 0 or _bad(st.get("act_max_abs"))]
    scale = v.scalars.get("loss_scale")
    if v.scalars.get("overflow") == 1.0 and scale is not None and not where and not _bad(v.loss):
        # fp16 mixed precision: the client's GradScaler overflowed and skipped the step, by design, unless its
        # scale has collapsed (the gradients overflow unscaled)
        bad = scale < MIN_LOSS_SCALE
        msg = f"gradient overflow at step {v.step} with the loss scale down to {scale:.3g}" if bad else ""
        return [Obs(r.name, "", bad, scale, MIN_LOSS_SCALE, msg)]
    where += [n for n, (_, st) in v.params.items() if _bad(st.get("grad_norm"))]
    bad = _bad(v.loss) or _bad(v.grad_norm_total) or bool(where)
    msg = ""
    if bad:
        first = (
            f"; first at step {origin['step']} ({origin.get('pass')}, layer {origin.get('layer')})" if origin else ""
        )
        if origin and origin.get("rank"):
            first += f" on rank {origin['rank']}"  # in a job of several ranks, where to look
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
        # A Linear/Conv output with no activation module after it: dead units of a functional ReLU, or the
        # negative half of a residual branch (a transformer's attention output); only nearly all is a finding.
        bar = max(r.threshold, PRE_ACTIVATION_DEAD) if name in v.pre_activations else r.threshold
        out.append(
            Obs(
                r.name,
                name,
                df > bar,
                df,
                bar,
                f"layer {name}: {df:.0%} of its {units} units dead (threshold {bar:.0%})",
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
    """(module name, grad norm) of matrix-shaped parameters in model order, where reported and finite. A parameter
    without a gradient (frozen, ``requires_grad=False``, grad None) has no row here: the client sends none."""
    return [
        (name.rsplit(".", 1)[0], st["grad_norm"])
        for name, (shape, st) in v.params.items()
        if len(shape) >= 2 and st.get("grad_norm") is not None and math.isfinite(st["grad_norm"])
    ]


def _norm(weight: tuple[str, float]) -> float:
    return weight[1]


def _push(hist: list[float], x: float, keep: int) -> None:
    """Append ``x`` (6 significant digits: the memory is JSON, written with every batch) and keep the last ``keep``."""
    hist.append(float(f"{x:.6g}"))
    del hist[:-keep]


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated."""
    at = q * (len(ordered) - 1)
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def _robust(ordered: list[float]) -> tuple[float, float, float]:
    """(median, spread, highest) of sorted values (one sort serves every loss test: this runs at every step of every
    run). The spread is the larger of the interquartile range over 1.349 and the distance from the median to the 90th
    percentile over 1.2816 (both one standard deviation for a normal): a loss whose batches are often near zero (tiny
    batches) has a narrow middle but a long upper tail, and that tail is its normal noise."""
    med = _quantile(ordered, 0.5)
    iqr = _quantile(ordered, 0.75) - _quantile(ordered, 0.25)
    return med, max(iqr / 1.349, (_quantile(ordered, 0.9) - med) / 1.2816), ordered[-1]


def gradient_jump(r: Rule, v: StepView, mem: dict[str, Any]) -> Obs | None:
    """``grad_norm_total`` against its own rolling median (every step, from the second one on): a norm ``factor``
    times the run's recent typical norm is an explosion whatever the model's scale."""
    g = v.grad_norm_total
    if g is None or not math.isfinite(g) or not r.factor:
        return None
    hist: list[float] = mem.setdefault(f"{r.name}.total", [])
    obs = None
    if hist:
        base = statistics.median(hist)
        limit = r.factor * base
        breach = base > 0 and g > limit
        msg = (
            f"total gradient norm {g:.3g} at step {v.step} is {g / base:.3g}x its recent median {base:.3g}"
            if breach
            else ""
        )
        obs = Obs(r.name, "", breach, g, limit, msg)
    _push(hist, g, builtin_setting(r, "window"))
    return obs


def gradients(r: Rule, v: StepView, exploding: bool, mem: dict[str, Any], report: bool) -> list[Obs]:
    """Per layer: the weight's gradient norm against the absolute ``threshold``, at reports. Run level: the
    bottom/top ratio against ``ratio`` (at reports; remembered between them) and, for exploding gradients, the
    total norm's jump (every step); one run-level observation says whether either holds."""
    out = []
    ratio_key = f"{r.name}.ratio"
    if report:
        lively = v.loss is None or not math.isfinite(v.loss) or v.loss > (r.loss_floor or 0.0)
        weights = _weights(v)
        for module, g in weights:
            if not r.matches_layer(module):
                continue
            breach = g > r.threshold if exploding else (g < r.threshold and lively)
            word = "above" if exploding else "below"
            msg = f"layer {module}: gradient norm {g:.3g} {word} {r.threshold:.3g}"
            out.append(Obs(r.name, module, breach, g, r.threshold, msg, ("param", f"{module}.weight", "grad_norm")))
        mem.pop(ratio_key, None)
        if r.ratio is not None and len(weights) >= 2:
            # The largest norm of the bottom quarter of the weight layers against that of the top quarter: one
            # matrix alone (an attention query at init, the first layer left trainable) may well be tiny.
            k = max(1, len(weights) // 4)
            (first, g0), (last, g1) = max(weights[:k], key=_norm), max(weights[-k:], key=_norm)
            if g1 > 0:
                ratio = g0 / g1
                breach = (ratio > r.ratio if exploding else ratio < r.ratio) and (exploding or lively)
                msg = f"gradient norm ratio bottom/top layers ({first}/{last}) = {ratio:.3g}, bound {r.ratio:.3g}"
                mem[ratio_key] = [breach, ratio, r.ratio, msg]
    jump = gradient_jump(r, v, mem) if exploding else None
    kept = mem.get(ratio_key)
    if jump is not None and (jump.breach or not (kept and kept[0])):
        out.append(jump)
    elif kept and (report or kept[0]):
        breach, value, bound, msg = kept
        out.append(Obs(r.name, "", breach, value, bound, msg))
    return out


RISE_K = 1.0  # the rise test's allowance per step, in normal scores: half the shift it is tuned to (2, the top 2.3%)
RISE_CAP = 2.0  # its sum is kept under 2 x `rise`: once the loss is back, a past rise is forgotten within a few steps
RISE_MIN_REL = 0.1  # and the loss must be 10% above the median (a near noise-free loss may rise by a hair, harmlessly)
_NORMAL = statistics.NormalDist()
BOUNDS = {  # loss_spike's bounds, as its messages name them
    "blow-up": "factor x the median of the first 5 losses",
    "spike": "median + max(threshold x spread, min_rel x median, 2 x (highest - median))",
    "rise": "median + 0.1 x |median|, the CUSUM of the loss's rank scores being above rise",
}


def _rank_score(ordered: list[float], x: float) -> float:
    """The normal score of ``x``'s rank among sorted values: the quantile of a standard normal at its mid-rank. While
    the loss is stationary its rank is uniform whatever its distribution (tiny batches, heavy tails), so the score is
    N(0, 1) and bounded (2.58 against 100 values): one outlier weighs no more than any loss above the whole window."""
    at = (bisect_left(ordered, x) + bisect_right(ordered, x)) / 2
    return _NORMAL.inv_cdf((at + 0.5) / (len(ordered) + 1))


def loss_spike(r: Rule, v: StepView, mem: dict[str, Any]) -> list[Obs]:
    """The loss against the last ``window`` losses (after ``warmup`` of them). A spike: one step above ``median +
    max(threshold x spread, min_rel x |median|, 2 x (highest - median))``. A rise, the start of a divergence: a
    one-sided CUSUM (Page's test) of the loss's rank scores in its window, ``S = max(0, S + score - 1)``, above
    ``rise``, while the loss is 10% above the median; noise scores about 0 and a decreasing loss below it, so ``S``
    only grows while the loss sits in the top of its recent range step after step. A blow-up, from the second step
    on, warm-up or not: above ``factor`` x the median of the first five."""
    if v.loss is None or not math.isfinite(v.loss):
        return []
    hist: list[float] = mem.setdefault(r.name, [])
    first: list[float] = mem.setdefault(f"{r.name}.first", [])
    mem.pop(f"{r.name}.rise", None)  # the 2-of-3 rise test's flags (until 2026-12)
    bounds: dict[str, float] = {}
    if first and r.factor:
        bounds["blow-up"] = r.factor * abs(statistics.median(first))
    robust, cusum = None, None
    if len(hist) >= (r.warmup or 1):
        ordered = sorted(hist)
        robust = med, spread, highest = _robust(ordered)
        bounds["spike"] = med + max(r.threshold * spread, (r.min_rel or 0.0) * abs(med), 2 * (highest - med))
        if r.rise:
            cusum = mem.get(f"{r.name}.cusum", 0.0) + _rank_score(ordered, v.loss) - RISE_K
            cusum = min(RISE_CAP * r.rise, max(0.0, cusum))
            mem[f"{r.name}.cusum"] = float(f"{cusum:.6g}")
            if cusum > r.rise:
                bounds["rise"] = med + RISE_MIN_REL * abs(med)
    out = []
    if bounds:
        kind = min(bounds, key=bounds.__getitem__)
        limit = bounds[kind]
        breach = v.loss > limit
        msg = ""
        if breach:
            msg = f"loss {v.loss:.4g} at step {v.step} above {limit:.4g}, a {kind}: {BOUNDS[kind]}"
            if robust:
                msg += " (median {:.4g}, spread {:.3g}, highest {:.4g}".format(*robust)
                msg += f", CUSUM {cusum:.3g}, rise {r.rise:.3g})" if cusum is not None else ")"
        out.append(Obs(r.name, "", breach, v.loss, limit, msg))
    if len(first) < 5:
        _push(first, v.loss, 5)
    _push(hist, v.loss, builtin_setting(r, "window"))
    return out


def loss_plateau(r: Rule, v: StepView, mem: dict[str, Any]) -> list[Obs]:
    """A trend, not a best: the median of the last ``patience`` steps' block medians (blocks of ``window`` steps)
    against the median of the ``patience`` steps before them. It breaches when the change either way is within a
    margin: ``min_delta`` of the loss, or ``threshold`` standard errors of the difference (from the blocks' own
    spread) when the loss is noisier than that; a gain inside the noise is no progress. Judged at block ends."""
    if v.loss is None or not math.isfinite(v.loss):
        return []
    size = builtin_setting(r, "window")
    span = max(2, builtin_setting(r, "patience") // size)
    block: list[float] = mem.setdefault(f"{r.name}.block", [])
    medians: list[float] = mem.setdefault(f"{r.name}.medians", [])  # (the rule's name held a best until 2026-12)
    block.append(v.loss)
    if len(block) < size:
        return []
    _push(medians, statistics.median(block), 2 * span)
    block.clear()
    if len(medians) < 2 * span:
        return []
    before, recent = medians[:span], medians[span:]
    old, new = statistics.median(before), statistics.median(recent)
    spread = 1.4826 * statistics.median([abs(x - old) for x in before] + [abs(x - new) for x in recent])
    stderr = 1.2533 * spread * math.sqrt(2 / span)  # of a difference of two medians of `span` blocks
    gain = old - new
    min_delta = r.min_delta or 0.0
    margin = max(min_delta * abs(old), (r.threshold or 0.0) * stderr)
    # flat: neither a gain nor a rise beyond the margin (a rising loss is loss_spike's, or a new task's)
    breach = -margin < gain < margin and new > (r.loss_floor or 0.0)
    msg = (
        f"loss median {new:.4g} over the last {span * size} steps vs {old:.4g} over the {span * size} before: "
        f"changed {-gain / abs(old) if old else 0.0:+.1%}, within the margin {margin:.3g} "
        f"(max of {min_delta:.1%} and {r.threshold or 0.0:.3g} standard errors)"
    )
    return [Obs(r.name, "", breach, new, old, msg)]


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
        elif r.kind == "exploding_gradients":
            out += gradients(r, v, True, mem, report)
        elif not report and not (r.kind == "threshold" and r.stat not in wire.LAYER_STATS + wire.PARAM_STATS):
            continue
        elif r.kind == "dead_units":
            out += dead_units(r, v)
        elif r.kind == "saturation":
            out += saturation(r, v)
        elif r.kind == "vanishing_gradients":
            out += gradients(r, v, False, mem, report)
        elif r.kind == "threshold":
            out += threshold(r, v)
    return out
