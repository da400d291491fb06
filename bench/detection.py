"""Detection: do the default rules page on real failures, early, and stay quiet on healthy training?

    python bench/detection.py                    # every scenario (1.5 to 4 min on a shared 2-core machine)
    python bench/detection.py --only gpt-diverge batch2-noisy --dump /tmp/series.json
    python bench/detection.py --sweep            # held-out runs: 30 controls on other seeds, 20 divergences

``--sweep`` runs, instead of the suite's own scenarios, every healthy control with its torch seeds shifted by
100, 200 and 300 (``--seeds``), and five divergences, a learning rate that grows (tiny GPT-2: 2, 4 or 8% a step
from step 150; the MLP: 1 or 3% a step from step 300) with seeds shifted by 0 to 3 (``--variant-seeds``): runs
the rules were not tuned on, through the same collector and tables.

Small models (MLPs, a CNN, RNNs, tiny GPT-2 and BERT from random-weight configs; the scenarios are in
``tests/scenarios/suite.py``) are trained for real on CPU under ``layerwatch.watch`` with default settings,
``mon.step()`` right after ``backward()``, against a real collector process (SQLite, ``--no-auth``, default
rules) whose only channel is a webhook in this process: a notification that reaches it is a page. Failures must
page their expected rule; a divergence, before its first non-finite loss. Controls must not page at all (a
deliberate data switch may page one ``loss_spike``). ``loss_plateau``, off by default, is opted in on every run
and counted apart: its figures are why it is off.

Beside the collector, three published loss-spike detectors run on the same loss series (finite losses):
llm-foundry's KillLossSpike (loss above 2x the mean of the last 100 losses for 4 steps in a row, once its
window is full), OLMo-core's (loss above mean + 6 std of the last 128), and a W&B-style z-score (above
mean + 3 std of the last 30). A detector's alarm is one rising edge; false alarms are counted per 1,000 steps.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

import layerwatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the real-server fixtures and the suite

from tests.scenarios.suite import PUBLISHED, SCENARIOS, Pager, Result, rising_edges, run, sweep
from tests.service.server import running_server

OPT_IN = ("loss_plateau",)  # off by default: measured apart, never counted as a default page
LOSS_SPIKE_KIND = re.compile(r", a (blow-up|spike|rise): ")  # which of loss_spike's tests paged (its message says)


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _page(p: dict[str, Any]) -> str:
    a, layers = p["alert"], p.get("incident", {}).get("layers") or []
    kind = LOSS_SPIKE_KIND.search(a["message"] or "") if a["rule"] == "loss_spike" else None
    return (
        f"{a['rule']}@{a['step']}"
        + (f" {kind[1]}" if kind else "")
        + (f" ({len(layers)} layers)" if len(layers) > 1 else "")
    )


def report(results: list[Result], every: int) -> None:
    print("\n## Scenarios\n")
    for r in results:
        print(f"- {r.scenario.name}: {r.scenario.note} ({r.steps} steps trained, {r.seconds:.0f} s)")
    print("\n## Failures: the first page of an expected rule; the published detectors on the same loss series\n")
    head = ["scenario", "expected", "fault", "NaN", "first page", "report", "lead", "killspike", "olmo6sd", "z3_30",
            "every page (incident layers)"]  # fmt: skip
    print(_row(head) + "\n" + _row(["---"] * len(head)))
    loss_runs, no_later, with_nan, before_nan = 0, Counter[str](), 0, 0
    for r in results:
        sc = r.scenario
        if not sc.expect:
            continue
        nan = r.first_nonfinite
        finite = r.losses[:nan] if nan is not None else r.losses
        hits = sorted((p["alert"]["step"], p["alert"]["rule"]) for p in r.pages if p["alert"]["rule"] in sc.expect)
        first = f"{hits[0][1]}@{hits[0][0]}" if hits else "MISSED"
        report_no = hits[0][0] // every + 1 if hits else "-"
        lead = nan - hits[0][0] if hits and nan is not None else "-"
        pub = []
        for name, fn in PUBLISHED.items():
            edges = [e for e in rising_edges(fn(finite)) if e >= (sc.fault_at or 0)]
            pub.append(edges[0] if edges else "-")
            if "loss_spike" in sc.expect and hits and (not edges or hits[0][0] <= edges[0]):
                no_later[name] += 1
        if "loss_spike" in sc.expect:
            loss_runs += 1
            with_nan += nan is not None
            before_nan += nan is not None and bool(hits) and hits[0][0] < nan
        pages = ", ".join(_page(p) for p in r.pages)
        print(_row([sc.name, "/".join(sc.expect), "-" if sc.fault_at is None else sc.fault_at,
                    "-" if nan is None else nan, first, report_no, lead, *pub, pages]))  # fmt: skip
    if loss_runs:
        tally = ", ".join(f"{n} {no_later[n]}" for n in PUBLISHED)
        print(f"\nOf {loss_runs} failures seen on the loss, the first page came no later than each detector's first"
              f" alarm after the fault (or it never alarmed) in: {tally}; before the NaN in {before_nan} of the"
              f" {with_nan} that reached one")  # fmt: skip
    print("\n## Controls: pages per 1,000 steps by rule (default rules; opt-in loss_plateau apart); the published")
    print("## detectors' alarms per 1,000 steps on the same loss series\n")
    head = ["scenario", "steps", "default rules", "loss_plateau (opt-in)", "killspike", "olmo6sd", "z3_30"]
    print(_row(head) + "\n" + _row(["---"] * len(head)))
    steps, ours, opt_in, pub_total = 0, 0, 0, Counter[str]()
    for r in results:
        sc = r.scenario
        if sc.expect:
            continue
        steps += r.steps
        per = Counter(p["alert"]["rule"] for p in r.pages if p["alert"]["rule"] not in OPT_IN)
        plateau = sum(p["alert"]["rule"] in OPT_IN for p in r.pages)
        ours += sum(max(0, n - sc.allowed.get(rule, 0)) for rule, n in per.items())
        opt_in += plateau
        shown = ", ".join(f"{k} {1000 * v / r.steps:.2f}" for k, v in sorted(per.items())) or "0"
        if sc.allowed:
            shown += f" (allowed: {', '.join(f'{n} {k}' for k, n in sc.allowed.items())})"
        cells = []
        for name, fn in PUBLISHED.items():
            n = len(rising_edges(fn(r.losses)))
            pub_total[name] += n
            cells.append(f"{1000 * n / r.steps:.2f}")
        print(_row([sc.name, r.steps, shown, f"{1000 * plateau / r.steps:.2f}", *cells]))
    if steps:
        print(_row(["all controls", steps, f"{1000 * ours / steps:.2f} beyond allowed ({ours} pages)",
                    f"{1000 * opt_in / steps:.2f}",
                    *(f"{1000 * pub_total[n] / steps:.2f}" for n in PUBLISHED)]))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="scenario names (without the sweep's #seed)")
    ap.add_argument("--dump", type=Path, help="write each scenario's losses, gradient norms and pages as JSON here")
    ap.add_argument("--sweep", action="store_true", help="held-out runs: controls on other seeds, divergence variants")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 200, 300], help="--sweep: the controls' seed offsets")
    ap.add_argument("--variant-seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                    help="--sweep: the divergence variants' seed offsets")  # fmt: skip
    args = ap.parse_args()
    pool = sweep(tuple(args.seeds), tuple(args.variant_seeds)) if args.sweep else SCENARIOS
    chosen = [s for s in pool if not args.only or s.name.split("#")[0] in args.only]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the small-init tanh net's activations are subnormal: 10x slower without
    pager = Pager()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        db, rules = f"sqlite:///{tmp}/lw.db", Path(tmp) / "rules.yaml"
        channel = {"type": "webhook", "url": pager.url}
        rules.write_text(yaml.safe_dump({"channels": {"pager": channel}}))
        subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db], check=True)
        env = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off", "LAYERWATCH_RULES_FILE": str(rules)}
        with running_server(db, log_path=Path(tmp) / "server.log", args=("--no-auth",), env=env) as (url, _):
            results = []
            for sc in chosen:
                r = run(sc, url, pager, plateau=True)  # the opt-in loss_plateau measured too, reported apart
                results.append(r)
                pages = ", ".join(_page(p) for p in r.pages)
                print(f"{sc.name}: {r.steps} steps in {r.seconds:.0f} s, pages: {pages or 'none'}", flush=True)
            alerts = httpx.get(f"{url}/api/v1/alerts", params={"limit": 1000}).json()
    print(f"\n{len(results)} runs in {time.perf_counter() - started:.0f} s; the collector recorded {len(alerts)} alerts"
          " (one per run, rule and layer)")  # fmt: skip
    report(results, layerwatch.Config().every)
    if args.dump:
        dump = {r.scenario.name: {"losses": r.losses, "norms": r.norms, "pages": r.pages} for r in results}
        args.dump.write_text(json.dumps(dump))


if __name__ == "__main__":
    main()
