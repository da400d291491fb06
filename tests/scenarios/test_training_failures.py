"""Deep tanh nets with bad initialisations, and a loss spike and a NaN injected mid-run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from .conftest import rules, sgd_step, train


@pytest.fixture(autouse=True)
def _flush_denormals():
    """Tiny activations of the small init are subnormal: 10x slower on CPU. Restored after: hypothesis (the
    OpenAPI fuzz test) refuses to run in a process that flushes subnormals."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _tanh_run(collector: str, init: str) -> list[dict]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(10):
        lin = nn.Linear(32 if i == 0 else 64, 64 if i < 9 else 1)
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)
        else:
            nn.init.normal_(lin.weight, std={"small": 0.01, "large": 1.0}[init])
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()] if i < 9 else [lin]
    model = nn.Sequential(*layers)
    x, y = torch.randn(256, 32), torch.randn(256, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    alerts, _ = train(collector, model, sgd_step(model, opt, lambda i: nn.functional.mse_loss(model(x), y)), 60,
                      f"tanh-{init}")  # fmt: skip
    return alerts


def test_tanh_too_small_init_vanishes(collector):
    assert "vanishing_gradients" in rules(_tanh_run(collector, "small"))


def test_tanh_too_large_init_saturates(collector):
    assert "saturation" in rules(_tanh_run(collector, "large"))


def test_tanh_xavier_raises_nothing(collector):
    assert _tanh_run(collector, "xavier") == []


@pytest.mark.parametrize("inject", [None, "spike", "nan"])
def test_spike_and_nan_mid_run(collector, inject):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    x, y = torch.randn(1024, 8), torch.randn(1024, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen, stop = [], []

    def loss_of(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,))
        xb = x[idx].clone()
        if inject == "nan" and i >= 60:
            xb[0, 0] = math.nan
        loss = nn.functional.mse_loss(model(xb), y[idx])
        return loss

    inner = sgd_step(model, opt, loss_of)

    def step(i: int):
        if stop:  # the on_alert callback asked to stop, inside the training process
            return None
        loss = inner(i)
        return loss * 20 if inject == "spike" and i == 80 else loss

    def on_alert(alert):
        seen.append(alert)
        if alert.rule == "non_finite":
            stop.append(alert.step)

    alerts, _ = train(collector, model, step, 120, f"inject-{inject}", on_alert=on_alert)
    if inject is None:
        assert alerts == []
    elif inject == "spike":
        spike = [a for a in alerts if a["rule"] == "loss_spike"]
        assert spike and spike[0]["step"] == 80 and spike[0]["fired_at"], alerts
        assert rules(alerts) == {"loss_spike"}
    else:
        nan = [a for a in alerts if a["rule"] == "non_finite"]
        assert nan and nan[0]["step"] == 60, alerts
        assert stop and any(a.rule == "non_finite" for a in seen)  # on_alert ran and stopped the run early
