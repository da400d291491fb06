"""Each rule against hand-made series (pure functions, no server), and the alert lifecycle over them."""

from __future__ import annotations

import datetime as dt
import importlib.util
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from layerwatch import wire
from layerwatch_server.api.alerting import parse_alerting
from layerwatch_server.rules.book import run_overrides
from layerwatch_server.rules.evaluate import Obs, StepView, evaluate_step
from layerwatch_server.rules.incidents import page
from layerwatch_server.rules.lifecycle import Lifecycle
from layerwatch_server.rules.spec import BUILTINS, Rule, RuleError, merge, parse_rule
from layerwatch_server.storage.models import AlertRow

NAN, INF = math.nan, math.inf
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def only(name: str, **fields: Any) -> dict[str, Rule]:
    """Just this rule (built-in defaults plus ``fields``); ``for`` is spelled ``for_`` here."""
    if "for_" in fields:
        fields["for"] = fields.pop("for_")
    return {name: parse_rule(name, fields)}


def step(
    n: int,
    loss: float | None = 1.0,
    *,
    layers: dict[str, tuple[str, int, dict[str, float | None]]] | None = None,
    grads: dict[str, float] | None = None,
    grad_norm_total: float | None = 1.0,
    scalars: dict[str, float] | None = None,
    lr: float | None = 1e-3,
) -> StepView:
    """A step; ``grads`` maps module name -> weight grad norm (a [16, 16] ``.weight`` plus a 1-D ``.bias``)."""
    params: dict[str, tuple[list[int], dict[str, float | None]]] = {}
    for module, g in (grads or {}).items():
        params[f"{module}.weight"] = ([16, 16], {"grad_norm": g})
        params[f"{module}.bias"] = ([16], {"grad_norm": 1e-12})  # biases never count
    return StepView(n, loss, grad_norm_total, scalars or {}, layers or {}, params, lr=lr)


class Harness:
    """Evaluation plus lifecycle, as the service does it, recording notified transitions. The run's alerts are
    shared; each rank has its own memory (counters, loss history), as in the database."""

    def __init__(self, rules: dict[str, Rule]) -> None:
        self.rules, self.mems = rules, {}
        self.alerts: dict[tuple[str, str], AlertRow] = {}
        self.events: list[tuple[str, str, str, int]] = []  # (rule, layer, firing|resolved, episode)
        self.obs: list[Obs] = []

    def feed(self, *views: StepView, origin: dict[str, Any] | None = None, rank: int = 0) -> Harness:
        def note(row: AlertRow, status: str, obs: Obs | None) -> None:
            self.events.append((row.rule, row.layer_key, status, row.episode))

        mem = self.mems.setdefault(rank, {})
        lc = Lifecycle("run1", "proj", rank, self.alerts, mem.setdefault("counters", {}), note, NOW)
        for v in views:
            for obs in evaluate_step(self.rules, v, mem, origin):
                self.obs.append(obs)
                lc.apply(obs, self.rules[obs.rule], v.step)
        return self

    def state(self, rule: str, layer: str = "") -> str | None:
        row = self.alerts.get((rule, layer))
        return row.state if row else None

    def breaches(self, rule: str) -> list[Obs]:
        return [o for o in self.obs if o.rule == rule and o.breach]


def relu(**stats: float | None) -> tuple[str, int, dict[str, float | None]]:
    return (wire.KIND_RELU, 100, dict(stats))


# -- non_finite -----------------------------------------------------------------------------------------------
def test_non_finite_loss_nan_fires_at_once_with_the_origin():
    h = Harness(only("non_finite")).feed(step(0), step(1, NAN), origin={"step": 1, "pass": "forward", "layer": "fc2"})
    assert h.events == [("non_finite", "", "firing", 1)]
    msg = h.alerts[("non_finite", "")].message
    assert "loss" in msg and "first at step 1 (forward, layer fc2)" in msg
    assert h.alerts[("non_finite", "")].severity == "critical"


def test_non_finite_activation_and_gradient():
    act = Harness(only("non_finite")).feed(step(0, layers={"fc1": relu(nonfinite=3.0, act_max_abs=1.0)}))
    assert act.state("non_finite") == "firing" and "fc1" in act.breaches("non_finite")[0].message
    big = Harness(only("non_finite")).feed(step(0, layers={"fc1": relu(nonfinite=0.0, act_max_abs=INF)}))
    assert big.state("non_finite") == "firing"
    grad = Harness(only("non_finite")).feed(step(0, grads={"fc1": 1.0, "fc2": INF}))
    assert grad.state("non_finite") == "firing" and "fc2.weight" in grad.breaches("non_finite")[0].message
    total = Harness(only("non_finite")).feed(step(0, grad_norm_total=INF))
    assert total.state("non_finite") == "firing"


def test_non_finite_skips_a_grad_scalers_overflow_until_its_scale_collapses():
    """fp16 mixed precision: the client marks a step whose only NaN/Inf are its gradients (``overflow``, with the
    GradScaler's ``loss_scale``); the scaler skipped it by design. A collapsed scale, or a NaN loss, still fires."""

    def overflow(n: int, scale: float, loss: float = 1.0) -> dict[str, Any]:
        scalars = {"overflow": 1.0, "loss_scale": scale}
        return step(n, loss, grads={"fc1": 1.0, "fc2": INF}, grad_norm_total=INF, scalars=scalars)

    skipped = Harness(only("non_finite")).feed(overflow(0, 65536.0), overflow(1, 32768.0), step(2))
    assert skipped.breaches("non_finite") == [] and skipped.events == []
    collapsed = Harness(only("non_finite")).feed(overflow(0, 2.0), overflow(1, 1.0), overflow(2, 0.5))
    assert collapsed.events == [("non_finite", "", "firing", 1)]
    alert = collapsed.alerts[("non_finite", "")]
    assert alert.step == 2 and "loss scale down to 0.5" in alert.message
    loss = Harness(only("non_finite")).feed(overflow(0, 65536.0, loss=NAN))
    assert loss.state("non_finite") == "firing"


def test_non_finite_clean_steps_do_not_breach():
    h = Harness(only("non_finite")).feed(
        *(
            step(i, 1.0 / (i + 1), layers={"fc": relu(nonfinite=0.0, act_max_abs=3.0)}, grads={"fc": 0.5})
            for i in range(20)
        )
    )
    assert not h.breaches("non_finite") and h.events == []


# -- dead_units -----------------------------------------------------------------------------------------------
def test_dead_units_fires_by_the_second_report():
    h = Harness(only("dead_units", run_threshold=None))
    h.feed(step(0, layers={"fc": relu(dead_frac=0.9)}))
    assert h.state("dead_units", "fc") == "pending" and h.events == []
    h.feed(step(1, layers={"fc": relu(dead_frac=0.9)}))
    assert h.events == [("dead_units", "fc", "firing", 1)]
    # at the threshold is not above it; a clean report resets the count and resolves
    h.feed(step(2, layers={"fc": relu(dead_frac=0.5)}))
    assert h.events[-1] == ("dead_units", "fc", "resolved", 1)


def test_dead_units_a_clean_report_in_between_restarts_the_count():
    frac = [0.9, 0.1, 0.9]
    h = Harness(only("dead_units", run_threshold=None)).feed(
        *(step(i, layers={"fc": relu(dead_frac=f)}) for i, f in enumerate(frac))
    )
    assert h.state("dead_units", "fc") == "pending" and h.events == []


def test_dead_units_nulls_between_window_ends_are_not_reports():
    # dead_frac is reported only at window ends; the None steps neither count nor reset
    series = [0.9, None, None, 0.9]
    h = Harness(only("dead_units", run_threshold=None))
    for i, f in enumerate(series[:-1]):
        h.feed(step(i, layers={"fc": relu(dead_frac=f)}))
    assert h.state("dead_units", "fc") == "pending"
    h.feed(step(3, layers={"fc": relu(dead_frac=series[-1])}))
    assert h.state("dead_units", "fc") == "firing"
    assert all(o.value is not None for o in h.obs)


def test_dead_units_run_level_share_of_relu_units_and_layer_glob():
    layers = {
        "enc.fc": (wire.KIND_RELU, 300, {"dead_frac": 0.4}),
        "dec.fc": (wire.KIND_RELU, 100, {"dead_frac": 1.0}),
        "head": (wire.KIND_BOUNDED, 1000, {"dead_frac": 0.0}),  # not ReLU-family: not in the run share
    }
    h = Harness(only("dead_units", for_=1, threshold=0.95, run_threshold=0.5)).feed(step(0, layers=layers))
    run_obs = next(o for o in h.obs if o.layer == "")
    assert run_obs.value == pytest.approx((0.4 * 300 + 1.0 * 100) / 400) and run_obs.breach  # 0.55
    assert h.state("dead_units", "") == "firing" and h.state("dead_units", "dec.fc") == "firing"
    assert h.state("dead_units", "enc.fc") is None
    enc_only = Harness(only("dead_units", for_=1, layer="enc.*", run_threshold=None)).feed(step(0, layers=layers))
    assert {o.layer for o in enc_only.obs} == {"enc.fc"}


# -- loss_spike -----------------------------------------------------------------------------------------------
def _noisy(i: int) -> float:
    return 2.0 + 0.05 * math.sin(i * 1.7)  # a plateau of noise


def test_loss_spike_catches_one_outlier_on_a_noisy_plateau():
    h = Harness(only("loss_spike")).feed(*(step(i, _noisy(i)) for i in range(40)))
    assert not h.breaches("loss_spike")
    h.feed(step(40, 9.0))
    assert h.events == [("loss_spike", "", "firing", 1)]
    clear = BUILTINS["loss_spike"]["clear"]
    h.feed(*(step(41 + i, _noisy(41 + i)) for i in range(clear - 1)))
    assert h.state("loss_spike") == "firing"  # a dip of a step or two does not end a divergence's incident
    h.feed(step(41 + clear, _noisy(41 + clear)))
    assert h.events[-1][2] == "resolved" and len(h.events) == 2


def test_loss_spike_baseline_is_not_dragged_by_a_few_outliers():
    h = Harness(only("loss_spike")).feed(*(step(i, _noisy(i)) for i in range(30)))
    h.feed(*(step(30 + i, 50.0) for i in range(3)))  # three huge outliers enter the window
    assert len(h.breaches("loss_spike")) == 1  # the first; the next two are of a kind seen a step before
    h.feed(*(step(33 + i, _noisy(33 + i)) for i in range(5)))
    assert len(h.breaches("loss_spike")) == 1  # the noise after them is still normal: median and quartiles did not move
    h.feed(step(38, 9.0))  # a smaller outlier while such big ones are in the window is of a kind seen lately
    assert len(h.breaches("loss_spike")) == 1
    h.feed(*(step(39 + i, _noisy(39 + i)) for i in range(100)), step(139, 9.0))  # once they have left it, it is not
    assert len(h.breaches("loss_spike")) == 2


def test_loss_spike_respects_warmup_and_ignores_non_finite():
    early = Harness(only("loss_spike")).feed(
        *(step(i, 10.0 if i == 5 else 2.0) for i in range(BUILTINS["loss_spike"]["warmup"]))
    )
    assert not early.breaches("loss_spike")  # 5x is no spike before `warmup` losses are known...
    blowup = Harness(only("loss_spike")).feed(step(0, 5.7), step(1, 40.0), step(2, 1e4), step(3, 1e16))
    assert [o.breach for o in blowup.obs] == [False, True, True]  # ...100x the first losses is, from step 1
    assert blowup.state("loss_spike") == "firing" and blowup.alerts[("loss_spike", "")].step == 2
    nan = Harness(only("loss_spike")).feed(*(step(i, 2.0) for i in range(25)), step(25, NAN))
    assert not nan.breaches("loss_spike")  # NaN is non_finite's job


def test_loss_spike_quiet_on_tiny_batches_whose_losses_are_often_near_zero():
    """Batch size 2: a quarter of the losses near 0 (the MAD collapses), single batches 15-25x the median."""
    rng = random.Random(0)
    series = [rng.choice([0.001, 0.01, 0.3, 0.5, 0.6, 0.8, 1.0, 1.5]) for _ in range(3000)]
    for i in range(0, 3000, 97):
        series[i] = rng.uniform(10, 16)  # 15-25x the median, every hundred steps or so
    h = Harness(only("loss_spike")).feed(*(step(i, x) for i, x in enumerate(series)))
    assert not h.breaches("loss_spike")


def test_loss_spike_rise_flags_a_sustained_rise_that_no_single_step_shows():
    """A divergence starts as losses at the top of their recent range step after step, each alone noise: the CUSUM
    of their rank scores crosses ``rise`` within a few steps; the same steps one in two, or a rise under 10%, do not."""
    base = [2.0 + 0.05 * _noise(i) for i in range(100)]
    rising = [2.25, 2.3, 2.28, 2.35, 2.4, 2.45]  # 12-22% up, far under the spike bound (+50%)
    h = Harness(only("loss_spike")).feed(*(step(i, x) for i, x in enumerate(base + rising)))
    first = next(o for o in h.obs if o.breach)
    assert h.alerts[("loss_spike", "")].step == 104 and ", a rise:" in first.message and "CUSUM" in first.message
    assert [o.breach for o in h.obs[-6:]] == [False] * 4 + [True] * 2  # the first four: noise, each alone
    alternate = [x for pair in zip(rising, base[:6], strict=True) for x in pair]
    one_in_two = Harness(only("loss_spike")).feed(*(step(i, x) for i, x in enumerate(base + alternate)))
    assert not one_in_two.breaches("loss_spike")  # high and normal in turn: the sum grows too slowly
    slight = Harness(only("loss_spike")).feed(*(step(i, x) for i, x in enumerate(base + [2.15] * 30)))
    assert not slight.breaches("loss_spike")  # a sustained rise of 7.5%: significant, but no divergence to page


def test_bench_replay_is_the_rules_own_cusum_and_lifecycle(monkeypatch):
    """bench/replay.py, whose figures docs/alerts.md cites, reads ``S`` from the rule's memory and pages through the
    lifecycle: on the rise above it sees what the service's path sees, step for step."""
    spec = importlib.util.spec_from_file_location("bench_replay", Path(__file__).parents[2] / "bench" / "replay.py")
    assert spec and spec.loader
    replay = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, replay)  # its dataclass looks its module up there
    spec.loader.exec_module(replay)
    series = [2.0 + 0.05 * _noise(i) for i in range(100)] + [2.25, 2.3, 2.28, 2.35, 2.4, 2.45]
    r = replay.replay(series)
    h = Harness(only("loss_spike")).feed(*(step(i, x) for i, x in enumerate(series)))
    assert r.pages == [h.alerts[("loss_spike", "")].step] == [104]
    assert r.breaches == [(104, "rise"), (105, "rise")] and len(h.breaches("loss_spike")) == 2
    assert r.alarms == [104] and r.top == r.top_gated == (h.mems[0]["loss_spike.cusum"], 105)


def test_loss_spike_decreasing_loss_never_fires():
    h = Harness(only("loss_spike")).feed(*(step(i, 5.0 / math.sqrt(i + 1)) for i in range(300)))
    assert not h.breaches("loss_spike")


# -- exploding / vanishing gradients ---------------------------------------------------------------------------
def test_exploding_gradients_absolute_bound_per_layer():
    h = Harness(only("exploding_gradients", ratio=None, factor=None))
    h.feed(step(0, grads={"fc1": 5e4, "fc2": 10.0}))
    assert h.events == [("exploding_gradients", "fc1", "firing", 1)]
    assert h.alerts[("exploding_gradients", "fc1")].value == 5e4


def test_exploding_gradients_total_norm_against_its_own_history_at_every_step():
    """A 100x jump of grad_norm_total inside one report is flagged at its step, whatever the model's scale."""
    rules = only("exploding_gradients")
    h = Harness(rules)
    for i in range(30):  # steps inside a report (report=False): the total norm is judged at each
        for obs in evaluate_step(rules, step(i, grad_norm_total=3.0 + 0.5 * math.sin(i)), h.mems.setdefault(0, {}),
                                 None, report=False):  # fmt: skip
            assert not obs.breach
    jumped = evaluate_step(rules, step(30, grad_norm_total=400.0), h.mems[0], None, report=False)
    assert [o.breach for o in jumped] == [True] and "x its recent median" in jumped[0].message
    big = Harness(rules).feed(*(step(i, grad_norm_total=2e3 * (1 + 0.1 * (i % 3))) for i in range(30)))
    assert not big.breaches("exploding_gradients")  # large but steady: this model's normal


def test_exploding_gradients_first_last_ratio():
    h = Harness(only("exploding_gradients", for_=1)).feed(step(0, grads={"fc1": 50.0, "fc2": 1.0, "fc3": 0.01}))
    ratio = next(o for o in h.obs if o.layer == "")
    assert ratio.value == pytest.approx(5e3) and ratio.breach and h.state("exploding_gradients") == "firing"
    ok = Harness(only("exploding_gradients", for_=1)).feed(step(0, grads={"fc1": 5.0, "fc2": 1.0}))
    assert not ok.breaches("exploding_gradients")


def test_vanishing_gradients_bound_ratio_and_converged_loss():
    h = Harness(only("vanishing_gradients", for_=1, ratio=None)).feed(step(0, 1.0, grads={"fc1": 1e-10, "fc2": 1.0}))
    assert [o.layer for o in h.breaches("vanishing_gradients")] == ["fc1"]
    # a loss already at the floor: tiny gradients are convergence, not a problem
    done = Harness(only("vanishing_gradients", for_=1, ratio=None)).feed(step(0, 1e-6, grads={"fc1": 1e-10}))
    assert not done.breaches("vanishing_gradients")
    ratio = Harness(only("vanishing_gradients", for_=1)).feed(step(0, 1.0, grads={"fc1": 1e-5, "fc2": 0.1, "fc3": 1.0}))
    r = next(o for o in ratio.obs if o.layer == "")
    assert r.value == pytest.approx(1e-5) and r.breach


def test_vanishing_gradients_fire_by_the_second_report():
    h = Harness(only("vanishing_gradients"))
    h.feed(step(0, 1.0, grads={"fc1": 1e-10, "fc2": 1.0}))
    assert h.state("vanishing_gradients", "fc1") == "pending"
    h.feed(step(1, 1.0, grads={"fc1": 1e-10, "fc2": 1.0}))
    assert h.state("vanishing_gradients", "fc1") == "firing"


def test_gradient_ratio_compares_the_largest_norms_of_the_bottom_and_top_quarters():
    """An attention query's tiny gradient at init is not vanishing while its block's other matrices learn."""
    block = {"l0.query": 1e-6, "l0.value": 0.05, "l1.query": 1e-6, "l1.value": 0.05, "l2.query": 1e-6,
             "l2.value": 0.05, "pooler": 0.2, "classifier": 0.5}  # fmt: skip
    h = Harness(only("vanishing_gradients", for_=1)).feed(step(0, 1.0, grads=block))
    assert not h.breaches("vanishing_gradients")
    deep = {f"fc{i}": 10.0 ** (-i) for i in range(8)}  # every layer 10x smaller than the next: vanishing
    deep = dict(reversed(deep.items()))
    d = Harness(only("vanishing_gradients", for_=1)).feed(step(0, 1.0, grads=deep))
    assert [o.layer for o in d.breaches("vanishing_gradients")] == [""]


# -- saturation -----------------------------------------------------------------------------------------------
def test_saturation_only_bounded_layers():
    layers = {
        "tanh": (wire.KIND_BOUNDED, 10, {"sat_frac": 0.8}),
        "fc": (wire.KIND_RELU, 10, {"sat_frac": 0.9}),  # not a bounded activation: ignored
        "sig": (wire.KIND_BOUNDED, 10, {"sat_frac": 0.2}),
    }
    h = Harness(only("saturation")).feed(*(step(i, layers=layers) for i in range(3)))
    assert h.events == [("saturation", "tanh", "firing", 1)]
    assert {o.layer for o in h.obs} == {"tanh", "sig"}


# -- loss_plateau ---------------------------------------------------------------------------------------------
def _noise(i: int) -> float:
    """Deterministic, heavy-ish noise in [-1, 1]."""
    return math.sin(i * 12.9898) * math.cos(i * 4.1414)


def test_loss_plateau_is_off_by_default_and_judges_a_trend():
    assert "loss_plateau" not in merge([], "p")  # on healthy runs that converge it cannot tell (docs/alerts.md)
    rules = only("loss_plateau", enabled=True, patience=100, window=10)
    h = Harness(rules).feed(*(step(i, 3.0 - 0.004 * i + 0.3 * _noise(i)) for i in range(400)))
    assert not h.breaches("loss_plateau")  # noisy but improving: 13% per 100 steps
    flat = Harness(rules).feed(*(step(i, 1.5 + 0.3 * _noise(i)) for i in range(400)))
    first = flat.breaches("loss_plateau")[0]
    assert flat.state("loss_plateau") == "firing" and "within the margin" in first.message
    assert [o for o in flat.obs if o.breach] and flat.obs[0].breach  # from the first judgement: 2 x patience steps
    assert len(flat.obs) == (400 - 200) // 10 + 1  # judged at block ends only


def test_rule_memory_written_by_the_previous_rules_is_read_without_error():
    """A run ingested across the upgrade: its memory holds the old plateau best and a 50-loss spike window."""
    rules = {**only("loss_plateau", enabled=True, patience=20, window=5), **only("loss_spike")}
    h = Harness(rules)
    h.mems[0] = {"loss_plateau": {"recent": [1.0] * 10, "best": 1.0, "best_step": 3}, "loss_spike": [1.0] * 50}
    h.feed(*(step(i, 1.0 + 0.01 * _noise(i)) for i in range(60)))
    assert h.state("loss_plateau") == "firing" and not h.breaches("loss_spike")


def test_loss_plateau_not_on_a_rise_a_converged_loss_or_a_gain_beyond_the_noise():
    rules = only("loss_plateau", enabled=True, patience=100, window=10)
    rise = Harness(rules).feed(*(step(i, 1.0 if i < 100 else 3.0) for i in range(200)))
    assert rise.obs and not rise.breaches("loss_plateau")  # a jump up is loss_spike's (or a new task's)
    floor = Harness(rules).feed(*(step(i, 1e-6) for i in range(400)))
    assert floor.obs and not floor.breaches("loss_plateau")
    slow = Harness(only("loss_plateau", enabled=True)).feed(*(step(i, 5.0 / math.sqrt(i + 1)) for i in range(2000)))
    assert slow.obs and not slow.breaches("loss_plateau")


# -- user threshold rules -------------------------------------------------------------------------------------
def test_threshold_rule_param_stat_with_op_for_and_glob():
    rules = only("big_grads", stat="grad_norm", op=">=", threshold=100.0, for_=2, layer="encoder.*")
    h = Harness(rules)
    v = {"encoder.0": 100.0, "decoder.0": 1e6}
    h.feed(step(0, grads=v))
    assert h.state("big_grads", "encoder.0.weight") == "pending"
    assert not any(k[1].startswith("decoder") for k in h.alerts)
    h.feed(step(1, grads=v))
    assert h.events == [("big_grads", "encoder.0.weight", "firing", 1)]
    assert h.alerts[("big_grads", "encoder.0.weight")].severity == "warning"


@pytest.mark.parametrize(
    ("stat", "op", "th", "view", "breach"),
    [
        ("loss", ">", 2.0, step(0, 3.0), True),
        ("loss", "<=", 2.0, step(0, 3.0), False),
        ("tokens_per_s", "<", 10.0, step(0, scalars={"tokens_per_s": 5.0}), True),
        ("grad_norm_total", "==", 1.0, step(0), True),
        ("lr", "<", 1e-6, step(0, lr=1e-8), True),
        ("act_mean", "!=", 0.0, step(0, layers={"fc": relu(act_mean=0.0)}), False),
    ],
)
def test_threshold_rule_ops_on_step_scalar_and_layer_stats(stat, op, th, view, breach):
    rules = only("mine", stat=stat, op=op, threshold=th)
    [obs] = evaluate_step(rules, view, {}, None)
    assert obs.breach is breach


def test_threshold_rule_unreported_stat_yields_nothing():
    assert evaluate_step(only("mine", stat="tokens_per_s", threshold=1.0), step(0), {}, None) == []


# -- lifecycle ------------------------------------------------------------------------------------------------
def test_lifecycle_dedups_and_reopens_as_a_new_episode():
    h = Harness(only("mine", stat="loss", threshold=2.0))
    h.feed(*(step(i, 3.0) for i in range(5)))
    assert h.events == [("mine", "", "firing", 1)] and len(h.alerts) == 1  # one alert, one notification
    h.feed(step(5, 1.0))
    h.feed(step(6, 3.0))
    row = h.alerts[("mine", "")]
    assert h.events[1:] == [("mine", "", "resolved", 1), ("mine", "", "firing", 2)]
    assert row.state == "firing" and row.episode == 2 and row.resolved_at is None and row.step == 6


def test_lifecycle_a_firing_alert_clears_after_clear_clean_reports():
    h = Harness(only("mine", stat="loss", threshold=2.0, clear=3))
    h.feed(step(0, 3.0), step(1, 1.0), step(2, 1.0), step(3, 3.0), step(4, 1.0), step(5, 1.0))
    assert h.events == [("mine", "", "firing", 1)]  # dips of two clean steps: one incident
    h.feed(step(6, 1.0))
    assert h.events[-1] == ("mine", "", "resolved", 1)


def test_lifecycle_pending_that_clears_is_never_announced():
    h = Harness(only("mine", stat="loss", threshold=2.0, for_=3))
    h.feed(step(0, 3.0), step(1, 3.0), step(2, 1.0))
    assert h.events == [] and h.state("mine") == "resolved"


def test_lifecycle_ranks_on_either_side_of_a_bound_do_not_flap():
    """Rank 1 saturates a layer, rank 0 stays just under the bound: one firing, no resolve/re-open per batch.
    The alert belongs to the rank that breached last; that rank's clean report resolves it."""
    h = Harness(only("saturation", threshold=0.5, for_=2))

    def tanh(sat_frac: float) -> dict[str, Any]:
        return {"layers": {"t": (wire.KIND_BOUNDED, 8, {"sat_frac": sat_frac})}}

    for i in range(6):
        h.feed(step(i, **tanh(0.7)), rank=1)
        h.feed(step(i, **tanh(0.45)), rank=0)
    row = h.alerts[("saturation", "t")]
    assert h.events == [("saturation", "t", "firing", 1)]
    assert (row.state, row.rank, row.value) == ("firing", 1, 0.7)
    h.feed(step(6, **tanh(0.8)), rank=0)  # rank 0 breaches now: the alert, still firing, moves to it
    assert (row.state, row.rank, row.step, row.value) == ("firing", 0, 6, 0.8)
    h.feed(step(7, **tanh(0.2)), rank=1)  # rank 1 is clean, but rank 0 breached last
    assert row.state == "firing"
    h.feed(step(7, **tanh(0.2)), rank=0)
    assert row.state == "resolved" and h.events[-1] == ("saturation", "t", "resolved", 1)


def test_lifecycle_keys_by_rule_and_layer():
    rules = {**only("a", stat="act_mean", threshold=0.0), **only("b", stat="act_mean", threshold=0.0)}
    h = Harness(rules).feed(step(0, layers={"x": relu(act_mean=1.0), "y": relu(act_mean=1.0)}))
    assert set(h.alerts) == {("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")}


# -- rule definitions and per-run overrides --------------------------------------------------------------------
def test_invalid_rules_name_the_field():
    with pytest.raises(RuleError, match=r"rules\.mine\.stat"):
        parse_rule("mine", {"threshold": 1.0})
    with pytest.raises(RuleError, match=r"rules\.mine\.threshold"):
        parse_rule("mine", {"stat": "loss"})
    with pytest.raises(RuleError, match=r"rules\.dead_units\.run_threshold"):
        parse_rule("dead_units", {"run_threshold": 2})
    with pytest.raises(RuleError, match=r"rules\.mine\.op"):
        parse_rule("mine", {"stat": "loss", "threshold": 1, "op": "=>"})
    with pytest.raises(RuleError, match=r"rules\.mine\.colour"):
        parse_rule("mine", {"stat": "loss", "threshold": 1, "colour": "red"})


def test_per_run_overrides_from_the_client_config():
    config = {"hparams": {"lr": 0.1, "rules": {"non_finite": {"enabled": False}, "dead_units": {"for": 1}}}}
    rules = merge([{"dead_units": {"threshold": 0.3}}, run_overrides(config)], "proj")
    assert "non_finite" not in rules
    assert rules["dead_units"].for_ == 1 and rules["dead_units"].threshold == 0.3  # file value kept
    # a bad run-level override falls back to the previous level instead of failing the other rules
    bad = merge([{"dead_units": {"threshold": 0.3}}, {"dead_units": {"threshold": "lots"}}], "proj")
    assert bad["dead_units"].threshold == 0.3
    assert run_overrides(None) == {} and run_overrides({"hparams": {"rules": "no"}}) == {}


def test_project_scoped_rules_apply_only_to_that_project():
    level = {"mine": {"stat": "loss", "threshold": 1.0, "project": "nlp"}}
    assert "mine" in merge([level], "nlp") and "mine" not in merge([level], "vision")


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"channels": {"m": {"type": "email", "to": ["a@b"]}}}, "channels.m.host"),
        ({"channels": {"m": {"type": "email", "host": "smtp"}}}, "channels.m.to"),
        ({"channels": {"s": {"type": "slack"}}}, "channels.s.url"),
        ({"channels": {}, "routes": [{"channels": ["nope"]}]}, "routes[0].channels"),
        ({"rules": {"mine": {"stat": "loss"}}}, "rules.mine.threshold"),
        ({"projects": {"nlp": {"dead_units": {"for": 0}}}}, "projects.nlp.rules.dead_units.for"),
        ({"notify": {"renotify_s": -1}}, "notify.renotify_s"),
    ],
)
def test_rules_file_errors_name_the_field(data, where):
    with pytest.raises(RuleError) as err:
        parse_alerting(data)
    assert str(err.value).startswith(where), err.value


def test_routes_by_project_and_severity():
    cfg = parse_alerting(
        {
            "channels": {n: {"type": "webhook", "url": f"http://h/{n}"} for n in ("ops", "chat", "all")},
            "routes": [
                {"channels": ["ops"], "severities": ["critical"]},
                {"channels": ["chat"], "projects": ["nlp*"]},
            ],
        }
    )
    assert cfg.channels_for("nlp-big", "critical") == ["ops", "chat"]
    assert cfg.channels_for("vision", "critical") == ["ops"] and cfg.channels_for("vision", "warning") == []
    assert parse_alerting({"channels": {"a": {"type": "webhook", "url": "u"}}}).channels_for("x", "info") == ["a"]


def test_dead_units_judges_layers_whose_dead_frac_is_a_finding_of_its_own():
    """Linear/Conv outputs count only where a functional relu may follow them; the output head never."""
    from layerwatch_server.core.batch import Batch
    from layerwatch_server.rules.evaluate import view

    from .batches import make_batch

    names = ["fc1", "act1", "fc2", "fc3", "tanh3", "head"]
    types = ["Linear", "ReLU", "Linear", "Linear", "Tanh", "Linear"]
    over: dict[tuple[int, int, str], float | None] = {(0, i, "dead_frac"): 1.0 for i in range(len(names))}
    over.update({(0, i, "nonfinite"): 0.0 for i in range(len(names))})
    raw = make_batch("k", steps=[0], n_layers=len(names), overrides=over)
    for layer, name, type_ in zip(raw["layers"], names, types, strict=True):
        layer["name"], layer["type"] = name, type_
    batch = Batch.model_validate(raw)
    rules = {"dead_units": merge([], "p")["dead_units"]}
    judged = {o.layer for o in evaluate_step(rules, view(batch, batch.steps[0]), {}, None) if o.layer}
    # fc1 feeds the ReLU module (which reports the same units), fc2 feeds another Linear (a functional relu may
    # sit between), fc3 feeds a tanh (never positive is no death there), head is the output.
    assert judged == {"act1", "fc2", "tanh3"}


# -- one page per cause -----------------------------------------------------------------------------------------
class PagingHarness(Harness):
    """The harness with the service's incident paging: transitions collected per feed, then paged."""

    def __init__(self, rules: dict[str, Rule]) -> None:
        super().__init__(rules)
        self.pages: list[tuple[str, str, str, list[str]]] = []  # (rule, lead layer, status, incident layers)

    def feed(self, *views: StepView, origin: dict[str, Any] | None = None, rank: int = 0) -> PagingHarness:
        events: list[tuple[AlertRow, str, Obs | None]] = []
        mem = self.mems.setdefault(rank, {})
        lc = Lifecycle("run1", "proj", rank, self.alerts, mem.setdefault("counters", {}),
                       lambda row, status, obs: events.append((row, status, obs)), NOW)  # fmt: skip
        for v in views:
            for obs in evaluate_step(self.rules, v, mem, origin):
                lc.apply(obs, self.rules[obs.rule], v.step)

        def send(row: AlertRow, status: str, obs: Obs | None, layers: list[str]) -> None:
            self.pages.append((row.rule, row.layer_key, status, layers))
            row.notified_at = NOW  # as outbox.enqueue does when a channel is routed

        page(events, self.alerts.values(), send)
        return self


def test_one_page_per_rule_naming_every_layer_then_one_resolution():
    rules = only("vanishing_gradients", ratio=None)
    tiny = {f"fc{i}": 1e-10 for i in range(6)} | {"head": 1.0}
    h = PagingHarness(rules).feed(step(0, grads=tiny), step(1, grads=tiny))
    assert len([a for a in h.alerts.values() if a.state == "firing"]) == 6  # the API keeps one alert per layer
    assert h.pages == [("vanishing_gradients", "fc0", "firing", [f"fc{i}" for i in range(6)])]
    h.feed(step(2, grads=tiny | {"fc7": 1e-10}), step(3, grads=tiny | {"fc7": 1e-10}))
    assert len(h.pages) == 1  # a layer joining the incident pages nobody
    h.feed(step(4, grads=tiny | {"fc0": 1.0, "fc7": 1e-10}))  # the lead clears: another layer takes the lead
    assert len(h.pages) == 1 and sum(a.notified_at is not None and a.state == "firing" for a in h.alerts.values()) >= 1
    h.feed(step(5, grads={name: 1.0 for name in [*tiny, "fc7"]}))
    assert len(h.pages) == 2 and h.pages[-1][2] == "resolved"
    assert set(h.pages[-1][3]) >= {"fc1", "fc2", "fc3", "fc4", "fc5", "fc7"}  # the layers that cleared last


def test_pages_are_per_rule_and_a_new_incident_pages_again():
    rules = {**only("saturation", for_=1), **only("dead_units", for_=1, run_threshold=None)}
    bad = {"t": (wire.KIND_BOUNDED, 8, {"sat_frac": 0.9}), "r": relu(dead_frac=0.9)}
    good = {"t": (wire.KIND_BOUNDED, 8, {"sat_frac": 0.1}), "r": relu(dead_frac=0.1)}
    h = PagingHarness(rules).feed(step(0, layers=bad)).feed(step(1, layers=good)).feed(step(2, layers=bad))
    assert sorted((r, s) for r, _, s, _ in h.pages) == [("dead_units", "firing")] * 2 + [("dead_units", "resolved")] + [
        ("saturation", "firing")
    ] * 2 + [("saturation", "resolved")]


def test_dead_units_a_linear_output_with_no_activation_module_needs_nearly_all_units_dead():
    rules = only("dead_units", for_=1, run_threshold=None)
    v = step(0, layers={"attn.out": relu(dead_frac=0.6), "act": relu(dead_frac=0.6)})
    v.pre_activations = frozenset({"attn.out"})
    h = Harness(rules).feed(v)
    assert {o.layer: o.breach for o in h.obs} == {"attn.out": False, "act": True}
    w = step(1, layers={"attn.out": relu(dead_frac=0.95)})
    w.pre_activations = frozenset({"attn.out"})
    assert Harness(rules).feed(w).state("dead_units", "attn.out") == "firing"
