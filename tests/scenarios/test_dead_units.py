"""Dead ReLU units: negative inputs, a stuck single unit, a learning rate that kills units."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .conftest import rules, sgd_step, train


def _mlp(widths: list[int]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(widths[:-1]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(widths[-2], widths[-1]))


def _negative_inputs_run(collector: str, negative: bool) -> list[dict]:
    torch.manual_seed(0)
    model = _mlp([16, 64, 64, 1])
    if negative:  # every first-layer pre-activation negative: the whole ReLU layer is dead
        with torch.no_grad():
            model[0].weight.abs_()
            model[0].bias.fill_(-0.1)
    x = -torch.rand(512, 16) if negative else torch.randn(512, 16)
    y = torch.randn(512, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    alerts, _ = train(collector, model, sgd_step(model, opt, lambda i: nn.functional.mse_loss(model(x), y)), 60,
                      f"negative-inputs-{negative}")  # fmt: skip
    return alerts


def test_negative_inputs_kill_every_unit(collector):
    alerts = _negative_inputs_run(collector, negative=True)
    dead = [a for a in alerts if a["rule"] == "dead_units" and a["state"] == "firing"]
    assert {a["layer"] for a in dead} >= {"1", None}, alerts  # the ReLU layer and the run-level share
    assert all(a["value"] > 0.5 for a in dead)


def test_healthy_inputs_raise_nothing(collector):
    assert _negative_inputs_run(collector, negative=False) == []


def _single_unit_run(collector: str, w0: float, b0: float) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(w0)
        model[0].bias.fill_(b0)
    x = 2 * torch.rand(256, 1)  # positive inputs: a negative weight puts every output below zero
    y = torch.relu(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = sgd_step(model, opt, lambda i: nn.functional.mse_loss(model(x), y))
    alerts, _ = train(collector, model, step, 420, f"single-unit-{w0}")
    return alerts


def test_single_unit_with_negative_init_gets_stuck(collector):
    alerts = _single_unit_run(collector, -1.0, 0.0)
    assert {"dead_units", "vanishing_gradients"} <= rules(alerts), alerts
    assert "loss_plateau" not in rules(alerts, None)  # off by default (docs/alerts.md)


def test_single_unit_with_positive_init_converges_quietly(collector):
    assert _single_unit_run(collector, 0.5, 0.1) == []


def _lr_run(collector: str, lr: float) -> list[dict]:
    torch.manual_seed(0)
    inputs = torch.randn(4096, 32)
    labels = (inputs @ torch.randn(32, 10)).argmax(1)
    model = _mlp([32, 256, 256, 256, 10])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def loss_of(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(inputs), (128,))
        return nn.functional.cross_entropy(model(inputs[idx]), labels[idx])

    alerts, _ = train(collector, model, sgd_step(model, opt, loss_of), 300, f"mlp-lr{lr}")
    return alerts


def test_high_learning_rate_kills_units(collector):
    alerts = _lr_run(collector, 0.5)
    layers = {a["layer"] for a in alerts if a["rule"] == "dead_units" and a["fired_at"]}
    assert layers & {"3", "5"}, alerts


def test_sane_learning_rate_raises_nothing(collector):
    assert _lr_run(collector, 0.05) == []
