"""Each rule against hand-made series (pure functions, no server), and the alert lifecycle over them."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest

from layerwatch import wire
from layerwatch_server.rules.config import parse_alerting
from layerwatch_server.rules.evaluate import Obs, StepView, evaluate_step
from layerwatch_server.rules.lifecycle import Lifecycle
from layerwatch_server.rules.service import run_overrides
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


def test_non_finite_clean_steps_do_not_breach():
    h = Harness(only("non_finite")).feed(
        *(
            step(i, 1.0 / (i + 1), layers={"fc": relu(nonfinite=0.0, act_max_abs=3.0)}, grads={"fc": 0.5})
            for i in range(20)
        )
    )
    assert not h.breaches("non_finite") and h.events == []


# -- dead_units -----------------------------------------------------------------------------------------------
def test_dead_units_fires_after_for_consecutive_reports():
    h = Harness(only("dead_units", run_threshold=None))
    h.feed(step(0, layers={"fc": relu(dead_frac=0.9)}), step(1, layers={"fc": relu(dead_frac=0.9)}))
    assert h.state("dead_units", "fc") == "pending" and h.events == []
    h.feed(step(2, layers={"fc": relu(dead_frac=0.9)}))
    assert h.events == [("dead_units", "fc", "firing", 1)]
    # at the threshold is not above it; a clean report resets the count and resolves
    h.feed(step(3, layers={"fc": relu(dead_frac=0.5)}))
    assert h.events[-1] == ("dead_units", "fc", "resolved", 1)


def test_dead_units_a_clean_report_in_between_restarts_the_count():
    frac = [0.9, 0.9, 0.1, 0.9, 0.9]
    h = Harness(only("dead_units", run_threshold=None)).feed(
        *(step(i, layers={"fc": relu(dead_frac=f)}) for i, f in enumerate(frac))
    )
    assert h.state("dead_units", "fc") == "pending" and h.events == []


def test_dead_units_nulls_between_window_ends_are_not_reports():
    # dead_frac is reported only at window ends; the None steps neither count nor reset
    series = [0.9, None, None, 0.9, None, None, 0.9]
    h = Harness(only("dead_units", run_threshold=None))
    for i, f in enumerate(series[:-1]):
        h.feed(step(i, layers={"fc": relu(dead_frac=f)}))
    assert h.state("dead_units", "fc") == "pending"
    h.feed(step(6, layers={"fc": relu(dead_frac=series[-1])}))
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
    h.feed(step(41, _noisy(41)))
    assert h.events[-1][2] == "resolved"


def test_loss_spike_baseline_is_not_dragged_by_a_few_outliers():
    h = Harness(only("loss_spike")).feed(*(step(i, _noisy(i)) for i in range(30)))
    h.feed(*(step(30 + i, 50.0) for i in range(3)))  # three huge outliers enter the window
    assert len(h.breaches("loss_spike")) == 3
    h.feed(*(step(33 + i, _noisy(33 + i)) for i in range(5)))
    assert len(h.breaches("loss_spike")) == 3  # the noise after them is still normal
    h.feed(step(38, 5.0))  # and a moderate spike is still caught: median and MAD did not move
    assert len(h.breaches("loss_spike")) == 4


def test_loss_spike_respects_warmup_and_ignores_non_finite():
    early = Harness(only("loss_spike")).feed(
        *(step(i, 10.0 if i == 5 else 2.0) for i in range(BUILTINS["loss_spike"]["warmup"]))
    )
    assert early.obs == []  # nothing judged before `warmup` losses are known
    nan = Harness(only("loss_spike")).feed(*(step(i, 2.0) for i in range(25)), step(25, NAN))
    assert not nan.breaches("loss_spike")  # NaN is non_finite's job


def test_loss_spike_decreasing_loss_never_fires():
    h = Harness(only("loss_spike")).feed(*(step(i, 5.0 / math.sqrt(i + 1)) for i in range(300)))
    assert not h.breaches("loss_spike")


# -- exploding / vanishing gradients ---------------------------------------------------------------------------
def test_exploding_gradients_absolute_bound_per_layer():
    h = Harness(only("exploding_gradients", ratio=None))
    h.feed(*(step(i, grads={"fc1": 5e3, "fc2": 10.0}) for i in range(3)))
    assert h.events == [("exploding_gradients", "fc1", "firing", 1)]
    assert h.alerts[("exploding_gradients", "fc1")].value == 5e3


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


def test_gradients_default_for_needs_consecutive_reports():
    h = Harness(only("vanishing_gradients"))
    h.feed(*(step(i, 1.0, grads={"fc1": 1e-10, "fc2": 1.0}) for i in range(4)))
    assert h.state("vanishing_gradients", "fc1") == "pending"
    h.feed(step(4, 1.0, grads={"fc1": 1e-10, "fc2": 1.0}))
    assert h.state("vanishing_gradients", "fc1") == "firing"


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
def test_loss_plateau_after_patience_steps_without_improvement():
    rules = only("loss_plateau", patience=20, window=5)
    h = Harness(rules).feed(*(step(i, 3.0 - 0.05 * i) for i in range(30)))  # improving
    assert not h.breaches("loss_plateau")
    h.feed(*(step(30 + i, 1.5 + 0.001 * (i % 2)) for i in range(30)))  # flat (within min_delta)
    first = h.breaches("loss_plateau")[0]
    assert h.state("loss_plateau") == "firing" and "has not improved" in first.message
    assert h.alerts[("loss_plateau", "")].step >= 30 + 20 - 1


def test_loss_plateau_first_breach_step_and_floor():
    h = Harness(only("loss_plateau", patience=20, window=5))
    h.feed(*(step(i, 1.0) for i in range(40)))
    steps = [i for i, o in enumerate(h.obs) if o.breach]
    # observations start at step 4 (a full window); best set there; breach from step 24 on
    assert steps and steps[0] + 4 == 24
    floor = Harness(only("loss_plateau", patience=20, window=5)).feed(*(step(i, 1e-6) for i in range(40)))
    assert not floor.breaches("loss_plateau")  # converged to (near) zero


def test_loss_plateau_defaults_quiet_on_a_slow_healthy_decay():
    h = Harness(only("loss_plateau")).feed(*(step(i, 5.0 / math.sqrt(i + 1)) for i in range(2000)))
    assert not h.breaches("loss_plateau")


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
