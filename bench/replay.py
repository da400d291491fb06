"""Replay ``loss_spike``: the collector's own rule code over loss series, to see what its rise test's CUSUM did.

    python bench/detection.py --dump /tmp/det.json && python bench/replay.py --dump /tmp/det.json
    python bench/replay.py --simulate                 # null simulations, 200,000 steps each (--steps, --seed)

Each series goes step by step through ``evaluate_step`` with the built-in ``loss_spike`` rule alone (its default
settings, as the collector runs it), one memory per run, and the real ``Lifecycle`` (``for``, ``clear``) on its
observations, as ingest does; ``S`` is the rule's own CUSUM, read from that memory after each step. Nothing of the
rule is re-implemented here: a change to it shows in these figures.

``--dump`` reads the JSON ``bench/detection.py --dump`` writes (each run's losses and the pages the collector sent)
and prints per run: the steps, the highest ``S``, the highest ``S`` at a step whose loss was more than 10% above its
window's median (the rise's gate), the lag-1 correlation of the losses less their centred rolling median over
``window`` steps (the noise, without the trend), the steps where ``loss_spike`` breached (by test), and its pages
replayed beside the collector's own (they agree: the replay is the collector's path); then totals over the healthy
controls (the data switch only before its switch, at ``fault_at``), the figures docs/alerts.md cites.

``--simulate`` feeds stationary noise, where every alarm is false: normal; log-normal (sigma 1.5); batch-2-like
(a draw from eight values between 0.001 and 1.5, a quarter of them near 0, and every 97th step 10-16, 15-25 times
the median, as ``test_loss_spike_quiet_on_tiny_batches_whose_losses_are_often_near_zero``); AR(1) at lag-1
correlation 0.2, 0.4 and 0.6. Normal and AR(1) noise are ``2 + 0.1 x`` with ``x`` of unit variance, so the 10%
gate sits 2 standard deviations above the median. An alarm is a rising edge of ``S > rise`` (the CUSUM alone,
before the gate); a page, one the rule's breaches would send. Seeded: the same ``--seed`` gives the same figures.
Pure Python at the rule's pace, about 8 s per 100,000 steps on a shared 2-core machine: ``--simulate``'s 1.2 million
steps take 2-2.5 min, the sweep's dump 7-13 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerwatch_server.rules.evaluate import RISE_MIN_REL, Obs, StepView, evaluate_step
from layerwatch_server.rules.lifecycle import Lifecycle
from layerwatch_server.rules.spec import Rule, parse_rule
from layerwatch_server.storage.models import AlertRow

NAME = "loss_spike"
KIND = re.compile(r", a (blow-up|spike|rise): ")  # which of the rule's tests breached (its message says)
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class Replay:
    """What ``loss_spike`` did over one series (steps numbered from 0, as the client numbers them)."""

    steps: int = 0
    top: tuple[float, int] = (0.0, -1)  # the highest S and its step
    top_gated: tuple[float, int] = (0.0, -1)  # the same, at steps whose loss was > 10% above the median
    alarms: list[int] = field(default_factory=list)  # rising edges of S > rise
    breaches: list[tuple[int, str]] = field(default_factory=list)  # (step, blow-up|spike|rise)
    pages: list[int] = field(default_factory=list)  # steps at which the alert fired


def lag1(losses: list[float], window: int) -> float:
    """The lag-1 correlation of the losses less their centred rolling median over ``window`` steps: the noise's own
    correlation, a trend (a loss going down) left out (NaN for too short or constant a series)."""
    h = window // 2
    x = [v for v in losses if math.isfinite(v)]
    r = [x[i] - statistics.median(x[i - h : i + h + 1]) for i in range(h, len(x) - h)]
    try:
        return statistics.correlation(r[:-1], r[1:])
    except statistics.StatisticsError:
        return math.nan


def default_rule() -> Rule:
    return parse_rule(NAME, {})


def replay(losses: Iterator[float] | list[float], rule: Rule | None = None, until: int | None = None) -> Replay:
    """Feed ``losses`` (one per step) through the real rule and lifecycle; a run's memory starts empty. ``S`` is
    watched (its highest, its alarms) before step ``until`` only; breaches and pages, throughout."""
    rule = rule or default_rule()
    rules, mem, alerts, out = {NAME: rule}, {}, {}, Replay()
    counters: dict[str, int] = mem.setdefault("counters", {})

    def note(row: AlertRow, status: str, obs: Obs | None) -> None:
        if status == "firing":
            out.pages.append(row.step)

    lc = Lifecycle("replay", "replay", 0, alerts, counters, note, NOW)
    above, warmup = False, rule.warmup or 1
    for i, loss in enumerate(losses):
        hist = mem.get(NAME, [])
        med = statistics.median(hist) if len(hist) >= warmup and math.isfinite(loss) else None
        for obs in evaluate_step(rules, StepView(i, loss, None, {}), mem, None):
            lc.apply(obs, rule, i)
            if obs.breach:
                kind = KIND.search(obs.message)
                out.breaches.append((i, kind[1] if kind else "?"))
        out.steps = i + 1
        if med is None or (until is not None and i >= until):
            continue
        s = mem[f"{NAME}.cusum"]
        if s > out.top[0]:
            out.top = (s, i)
        if loss > med + RISE_MIN_REL * abs(med) and s > out.top_gated[0]:
            out.top_gated = (s, i)
        if s > rule.rise and not above:
            out.alarms.append(i)
        above = s > rule.rise
    return out


def _spans(breaches: list[tuple[int, str]]) -> str:
    """Breach steps as runs of consecutive steps of one test: ``213-219 rise, 220 spike``."""
    parts: list[list[Any]] = []
    for at, kind in breaches:
        if parts and parts[-1][1] == at - 1 and parts[-1][2] == kind:
            parts[-1][1] = at
        else:
            parts.append([at, at, kind])
    return ", ".join(f"{a}{'' if a == b else f'-{b}'} {k}" for a, b, k in parts) or "none"


def _scenarios() -> dict[str, Any]:
    """The suite's scenarios by name (expectations and fault steps); imported late: it brings torch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.scenarios.suite import DIVERGENCES, SCENARIOS

    return {sc.name: sc for sc in [*SCENARIOS, *DIVERGENCES]}


def from_dump(path: Path) -> None:
    runs: dict[str, Any] = json.loads(path.read_text())
    known = _scenarios()
    rule = default_rule()
    print(f"{NAME} replayed (rise {rule.rise:g}, window {rule.window}, warmup {rule.warmup}) on {len(runs)} runs"
          f" of {path}\n")  # fmt: skip
    print("| run | kind | steps | max S (step) | max S, loss > 10% above median (step) | lag-1 corr. | S > rise"
          " | breaches | pages replayed | pages by the collector |")  # fmt: skip
    print("|" + " --- |" * 10)
    total = {"runs": 0, "steps": 0, "top": (0.0, ""), "gated": (0.0, ""), "lag1": (-math.inf, ""), "alarms": 0,
             "pages": 0}  # fmt: skip
    started, agree = time.perf_counter(), 0
    for name, run in runs.items():
        sc = known.get(name.split("#")[0])
        control = sc is not None and not sc.expect
        until = sc.fault_at if control else None  # the data switch: S judged on its healthy part, before the switch
        r = replay(run["losses"], rule, until)
        collector = [p["alert"]["step"] for p in run["pages"] if p["alert"]["rule"] == NAME]
        agree += r.pages == collector
        steps = min(r.steps, until or r.steps)
        corr = lag1(run["losses"][:steps], rule.window or 100)
        kind = "?" if sc is None else "control" if control else "failure"
        cut = f" (S to {until})" if until is not None else ""
        print(f"| {name} | {kind} | {r.steps}{cut} | {r.top[0]:.2f} ({r.top[1]}) | {r.top_gated[0]:.2f}"
              f" ({r.top_gated[1]}) | {corr:.2f} | {len(r.alarms)} | {_spans(r.breaches)} | {r.pages or '-'}"
              f" | {collector or '-'} |")  # fmt: skip
        if control:
            total["runs"] += 1
            total["steps"] += steps
            total["alarms"] += len(r.alarms)
            total["pages"] += len([s for s in r.pages if s < (until or steps)])
            total["top"] = max(total["top"], (r.top[0], f"{name}@{r.top[1]}"))
            total["gated"] = max(total["gated"], (r.top_gated[0], f"{name}@{r.top_gated[1]}"))
            if not math.isnan(corr):
                total["lag1"] = max(total["lag1"], (corr, name))
    t = total
    print(f"\nControls: {t['runs']} runs, {t['steps']:,} steps (the data switch before its switch): highest S"
          f" {t['top'][0]:.2f} ({t['top'][1]}); where the loss was > 10% above its median {t['gated'][0]:.2f}"
          f" ({t['gated'][1]}); S > rise {t['alarms']} times; {NAME} pages {t['pages']}; highest lag-1 correlation"
          f" of the loss less its centred rolling median {t['lag1'][0]:.2f} ({t['lag1'][1]})")  # fmt: skip
    print(f"All runs: the replayed {NAME} pages are the collector's, at the same steps, in {agree} of {len(runs)}")
    print(f"({time.perf_counter() - started:.1f} s)")


def _ar1(rho: float) -> Callable[[random.Random], Iterator[float]]:
    def gen(rng: random.Random) -> Iterator[float]:
        x, scale = rng.gauss(0, 1), math.sqrt(1 - rho * rho)
        while True:
            yield 2.0 + 0.1 * x
            x = rho * x + scale * rng.gauss(0, 1)

    return gen


def _normal(rng: random.Random) -> Iterator[float]:
    while True:
        yield 2.0 + 0.1 * rng.gauss(0, 1)


def _lognormal(rng: random.Random) -> Iterator[float]:
    while True:
        yield math.exp(rng.gauss(0, 1.5))


def _batch2(rng: random.Random) -> Iterator[float]:
    """The unit test's series, extended: eight values (ties, which the rule ranks at their mid-rank), and every 97th
    step 10-16, so an outlier always has one of its kind in the window, as a batch-2 run's losses do."""
    values = [0.001, 0.01, 0.3, 0.5, 0.6, 0.8, 1.0, 1.5]
    i = 0
    while True:
        yield rng.uniform(10, 16) if i % 97 == 0 else rng.choice(values)
        i += 1


NULLS: dict[str, Callable[[random.Random], Iterator[float]]] = {
    "normal": _normal,
    "log-normal (sigma 1.5)": _lognormal,
    "batch-2-like": _batch2,
    **{f"AR(1) {rho}": _ar1(rho) for rho in (0.2, 0.4, 0.6)},
}


def simulate(steps: int, seed: int) -> None:
    rule = default_rule()
    print(f"{NAME} replayed on stationary noise, {steps:,} steps each, seed {seed} (rise {rule.rise:g}, window"
          f" {rule.window})\n")  # fmt: skip
    print("| noise | max S | S > rise per 1,000 steps | breaches: rise, spike, blow-up | pages per 1,000 steps | s |")
    print("|" + " --- |" * 6)
    started = time.perf_counter()
    for name, gen in NULLS.items():
        t0 = time.perf_counter()
        series = gen(random.Random(f"{seed}/{name}"))  # a str seed is hashed deterministically (sha512)
        r = replay((next(series) for _ in range(steps)), rule)
        kinds = [k for _, k in r.breaches]
        by_kind = ", ".join(str(kinds.count(k)) for k in ("rise", "spike", "blow-up"))
        print(f"| {name} | {r.top[0]:.2f} | {1000 * len(r.alarms) / steps:.3f} ({len(r.alarms)}) |"
              f" {by_kind} | {1000 * len(r.pages) / steps:.3f}"
              f" ({len(r.pages)}) | {time.perf_counter() - t0:.0f} |", flush=True)  # fmt: skip
    print(f"\n({time.perf_counter() - started:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", type=Path, help="the JSON `bench/detection.py --dump` wrote")
    ap.add_argument("--simulate", action="store_true", help="the null simulations")
    ap.add_argument("--steps", type=int, default=200_000, help="--simulate: steps per simulation")
    ap.add_argument("--seed", type=int, default=0, help="--simulate: the seed")
    args = ap.parse_args()
    if not args.dump and not args.simulate:
        ap.error("give --dump FILE, --simulate or both")
    if args.dump:
        from_dump(args.dump)
    if args.simulate:
        if args.dump:
            print()
        simulate(args.steps, args.seed)


if __name__ == "__main__":
    main()
