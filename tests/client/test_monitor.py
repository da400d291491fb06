"""The monitor on real small models, read back from the offline spool exactly as the collector would get it."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import layerwatch
from layerwatch.syncs import HostReads
from tests.client.conftest import layer_rows, read_spool
from tests.waiting import wait_until


def offline(model: nn.Module, tmp_path: Path, **kwargs) -> layerwatch.Monitor:
    return layerwatch.watch(model, run_name="t", project="p", mode="offline", spool_dir=str(tmp_path), **kwargs)


def test_public_api_is_pinned():
    assert layerwatch.__all__ == ["Alert", "Config", "Monitor", "__version__", "register_type", "watch"]


def test_a_unit_alive_on_one_batch_of_the_window_is_alive(tmp_path):
    model = nn.Sequential(nn.ReLU())
    mon = offline(model, tmp_path, every=4, window=2)
    batches = [  # (batch, units): unit 0 alive at step 0 only, unit 1 at step 1 only, units 2-3 never
        torch.tensor([[1.0, -1.0, -1.0, -1.0]]),
        torch.tensor([[-1.0, 2.0, -1.0, -1.0]]),
        torch.tensor([[-1.0, -1.0, -1.0, -1.0]]),
        torch.tensor([[-1.0, -1.0, -1.0, 3.0]]),
    ]
    for x in batches:
        model(x)
        mon.step()
    mon.close()
    rows = layer_rows(read_spool(tmp_path), "0")
    assert [rows[s]["dead_frac"] for s in range(4)] == [None, 0.5, None, 0.75]
    assert [rows[s]["zero_frac"] for s in range(4)] == [0.75, 0.75, 1.0, 0.75]


class FunctionalReLU(nn.Module):
    """A conv whose ReLU is F.relu, not a module: only the conv's own output shows its dead channels."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def dead_biased_conv() -> nn.Conv2d:
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.bias[:2] = -1e3  # channels 0 and 1 never positive
        conv.bias[2:] = 1e3
    return conv


def test_dead_channels_of_a_conv_layer(tmp_path):
    model = nn.Sequential(dead_biased_conv(), nn.ReLU())
    mon = offline(model, tmp_path, every=3)
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        mon.step()
    mon.close()
    batches = read_spool(tmp_path)
    assert layer_rows(batches, "1")[2]["dead_frac"] == 0.5
    # The conv's output feeds the ReLU module, which measures its channels: the conv reports its
    # distribution only, and no zero or dead fraction of its own, from its first step on (issue #14).
    conv_rows = layer_rows(batches, "0")
    assert [row["zero_frac"] for row in conv_rows.values()] == [None, None, None]
    assert conv_rows[2]["dead_frac"] is None
    assert conv_rows[2]["act_max_abs"] > 999 and conv_rows[2]["nonfinite"] == 0.0
    layers = {entry["name"]: entry for entry in batches[0]["layers"]}
    assert layers["0"]["units"] == 4 and layers["0"]["shape"] == [2, 4, 6, 6]


@pytest.mark.parametrize("inplace", [False, True])
def test_a_relu_after_a_linear_matches_torch_on_its_own_output(tmp_path, inplace):
    # The ReLU takes its maximum from the Linear's record and its units' activity from per-unit sums:
    # every figure must still be the ReLU output's own.
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(inplace=inplace))
    with torch.no_grad():
        model[0].bias[:8] = -100.0  # 8 units never active
    seen = []
    model[1].register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    mon = offline(model, tmp_path, every=3)
    for _ in range(3):
        model(torch.randn(10, 6)).sum().backward()
        mon.step()
    mon.close()
    rows = layer_rows(read_spool(tmp_path), "1")
    for step, out in enumerate(seen):
        flat = out.double().flatten()
        assert rows[step]["act_mean"] == pytest.approx(flat.mean().item(), rel=1e-5)
        assert rows[step]["act_std"] == pytest.approx(flat.std().item(), rel=1e-4)
        assert rows[step]["act_max_abs"] == pytest.approx(flat.abs().max().item(), rel=1e-6)
        assert rows[step]["zero_frac"] == pytest.approx((flat == 0).double().mean().item())
    window = torch.stack(seen).amax(dim=(0, 1))
    assert rows[2]["dead_frac"] == pytest.approx((window <= 0).double().mean().item()) and rows[2]["dead_frac"] >= 0.25


def test_dead_channels_before_a_functional_relu(tmp_path):
    model = FunctionalReLU(dead_biased_conv())
    mon = offline(model, tmp_path, every=3)
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        mon.step()
    mon.close()
    rows = layer_rows(read_spool(tmp_path), "conv")
    assert rows[2]["dead_frac"] == 0.5
    assert [rows[s]["zero_frac"] for s in range(3)] == [0.0, 0.0, 0.0]


def test_steps_loss_lr_scalars_and_gradients_match_torch(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = offline(model, tmp_path, every=4)
    expected = []
    for _ in range(10):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        weights = {n: p.norm().item() for n, p in model.named_parameters()}
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        expected.append((loss.item(), grads, weights, total))
        mon.step(loss=loss, lr=0.05, accuracy=torch.tensor(0.5), epoch=1)
        opt.step()
        opt.zero_grad()
    mon.close()
    batches = read_spool(tmp_path)
    assert [len(b["steps"]) for b in batches] == [4, 4, 2]
    assert batches[-1]["end"] == {"status": "finished"}
    assert "config" in batches[0]["run"] and "config" not in batches[1]["run"]
    names = [p["name"] for p in batches[0]["params"]]
    steps = [s for b in batches for s in b["steps"]]
    assert [s["step"] for s in steps] == list(range(10))
    last_weights: dict[str, float] = {}
    for step, (loss, grads, weights, total) in zip(steps, expected, strict=True):
        assert step["loss"] == pytest.approx(loss, rel=1e-6)
        assert step["lr"] == 0.05
        assert step["scalars"] == {"accuracy": 0.5, "epoch": 1.0}
        assert step["grad_norm_total"] == pytest.approx(total, rel=1e-5)
        full = step["step"] % 4 == 3  # full parameter statistics once per report interval
        for row in step["params"]:
            stat = dict(zip(batches[0]["param_stats"], row[1:], strict=True))
            name = names[row[0]]
            assert stat["grad_norm"] == pytest.approx(grads[name], rel=1e-5)
            if full:
                assert stat["weight_norm"] == pytest.approx(weights[name], rel=1e-5)
                assert stat["update_ratio"] == pytest.approx(0.05 * grads[name] / weights[name], rel=1e-5)
                assert stat["grad_nonfinite"] == 0
                last_weights[name] = weights[name]
            else:
                assert stat["weight_norm"] is None and stat["grad_nonfinite"] is None
                want = 0.05 * grads[name] / last_weights[name] if name in last_weights else None
                assert stat["update_ratio"] == (pytest.approx(want, rel=1e-5) if want else None)


def test_param_every_one_gives_every_statistic_every_step(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    mon = offline(model, tmp_path, every=4, param_every=1)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        mon.step(lr=0.1)
        model.zero_grad()
    mon.close()
    batch = read_spool(tmp_path)[0]
    for step in batch["steps"]:
        for row in step["params"]:
            assert None not in row


def test_saturated_tanh_is_measured(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    with torch.no_grad():
        model[0].weight.mul_(100)
    mon = offline(model, tmp_path, every=1)
    model(torch.randn(64, 16)).sum().backward()
    mon.step()
    mon.close()
    rows = layer_rows(read_spool(tmp_path), "1")
    assert rows[0]["sat_frac"] > 0.8
    assert layer_rows(read_spool(tmp_path), "0")[0]["sat_frac"] is None


def test_first_nan_origin_in_forward_pass(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = offline(model, tmp_path, every=4)
    for step in range(12):
        if step == 5:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")
        if step == 8:  # the report of steps 4-7 showed the NaN: element counting is switched on
            wait_until(lambda: mon.recorder.count_nonfinite, 10, "element counting to be switched on", 0.01)
        model(torch.randn(16, 4)).mean().backward()
        mon.step(loss=torch.tensor(1.0))
        model.zero_grad()
    mon.close()
    batches = read_spool(tmp_path)
    origins = [b["nonfinite_origin"] for b in batches if b["nonfinite_origin"]]
    assert origins == [{"step": 5, "pass": "forward", "layer": "2", "rank": 0}]
    nan_layer = layer_rows(batches, "2")
    # Seen in the sums at once; counted element by element from the step after its report was read.
    assert math.isnan(nan_layer[5]["act_mean"]) and nan_layer[5]["nonfinite"] is None
    assert nan_layer[9]["nonfinite"] == 16  # one unit, 16 samples: counted, not filtered
    assert layer_rows(batches, "0")[5]["nonfinite"] == 0  # a finite sum proves there were none
    assert layer_rows(batches, "0")[9]["nonfinite"] == 0


def test_first_nan_origin_in_backward_pass(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    mon = offline(model, tmp_path, every=2)
    for step in range(4):
        handle = model[2].weight.register_hook(lambda g: g * float("inf")) if step == 3 else None
        model(torch.randn(16, 4)).pow(2).mean().backward()
        mon.step()
        model.zero_grad()
        if handle:
            handle.remove()
    mon.close()
    origins = [b["nonfinite_origin"] for b in read_spool(tmp_path) if b["nonfinite_origin"]]
    assert origins == [{"step": 3, "pass": "backward", "layer": "2.weight", "rank": 0}]


def test_first_nan_origin_in_the_loss(tmp_path):
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    mon = offline(model, tmp_path, every=2)
    out = model(torch.randn(2, 4))
    mon.step(loss=torch.log(out * 0).sum())  # -inf loss from finite activations
    mon.close()
    origins = [b["nonfinite_origin"] for b in read_spool(tmp_path) if b["nonfinite_origin"]]
    assert origins == [{"step": 0, "pass": "loss", "layer": None, "rank": 0}]


def test_close_removes_every_hook_and_is_idempotent(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.GELU())
    mon = offline(model, tmp_path)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 4
    mon.close()
    mon.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    mon.step()  # after close: a no-op, never an error


def test_context_manager_marks_failed_runs(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError), offline(model, tmp_path) as mon:
        model(torch.randn(1, 2))
        mon.step()
        raise RuntimeError("boom")
    assert read_spool(tmp_path)[-1]["end"] == {"status": "failed"}


def test_shared_module_at_two_unit_counts_is_two_layers_and_calls_merge(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 8), nn.Linear(8, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model = Net()
    mon = offline(model, tmp_path, every=1)
    model(torch.randn(5, 4)).sum().backward()
    model(torch.randn(5, 4)).sum().backward()  # gradient accumulation: a second forward in one step
    mon.step()
    mon.close()
    batch = read_spool(tmp_path)[0]
    assert [entry["name"] for entry in batch["layers"]] == ["a", "act", "b", "act#1"]
    assert [entry["units"] for entry in batch["layers"]] == [8, 8, 3, 3]
    # Rows come in execution order of first calls; merged calls keep one row per layer.
    assert [row[0] for row in batch["steps"][0]["layers"]] == [0, 1, 2, 3]


def test_validation_passes_are_not_recorded(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = offline(model, tmp_path, every=1)
    with torch.no_grad():
        model(torch.full((3, 4), 1e6))
    model(torch.randn(3, 4)).sum().backward()
    mon.step()
    mon.close()
    assert layer_rows(read_spool(tmp_path), "0")[0]["act_max_abs"] < 1e5


def test_include_and_exclude_patterns_and_types(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.LayerNorm(4))
    mon = offline(model, tmp_path, include=["0", "1", "3"], exclude=["1"], types=[nn.Linear, nn.LayerNorm])
    model(torch.randn(2, 4)).sum().backward()
    mon.step()
    mon.close()
    assert [entry["name"] for entry in read_spool(tmp_path)[0]["layers"]] == ["0", "3"]


def test_the_training_thread_never_reads_a_tensor_value(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2), nn.Sigmoid())
    mon = offline(model, tmp_path, every=3, window=2)
    counter = HostReads()
    with counter:
        for _ in range(7):
            loss = model(torch.randn(2, 3, 8, 8)).mean()
            loss.backward()
            mon.step(loss=loss, lr=torch.tensor(0.1), accuracy=torch.tensor(0.5))
    mon.close()
    assert counter.calls == []
    assert sum(len(b["steps"]) for b in read_spool(tmp_path)) == 7
    with counter:  # the counter does see a read when there is one
        torch.tensor(1.0).item()
    assert counter.calls == ["item"]


def test_environment_supplies_defaults_and_a_bad_value_is_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LAYERWATCH_PROJECT", "from-env")
    monkeypatch.setenv("LAYERWATCH_RUN_NAME", "env-run")
    monkeypatch.setenv("LAYERWATCH_EVERY", "not-a-number")
    monkeypatch.setenv("LAYERWATCH_SPOOL_DIR", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        mon = layerwatch.watch(nn.Linear(2, 2))
    assert "LAYERWATCH_EVERY" in caplog.text
    assert mon.config.every == 10 and mon.config.mode == "offline"
    assert (mon.config.project, mon.run_name, mon.run_key) == ("from-env", "env-run", "slurm-4242")
    mon.close()
    explicit = layerwatch.watch(nn.Linear(2, 2), project="arg", every=3)
    assert (explicit.config.project, explicit.config.every) == ("arg", 3)
    explicit.close()


def test_invalid_arguments_are_refused_with_a_message():
    with pytest.raises(ValueError, match="every must be >= 1"):
        layerwatch.watch(nn.Linear(2, 2), every=0)
    with pytest.raises(ValueError, match="needs a collector url"):
        layerwatch.watch(nn.Linear(2, 2), mode="online")
    with pytest.raises(TypeError, match="unknown layerwatch setting"):
        layerwatch.watch(nn.Linear(2, 2), evry=3)


def test_bad_step_values_are_refused_naming_the_value(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    mon = offline(model, tmp_path)
    with pytest.raises(ValueError, match=r"step\(loss=...\) takes a scalar"):
        mon.step(loss=torch.ones(3))
    with pytest.raises(TypeError, match=r"step\(accuracy=...\) takes a number"):
        mon.step(accuracy="high")
    mon.step(loss=torch.tensor(1.0))  # monitoring still works after a refused call
    mon.close()
    assert len(read_spool(tmp_path)[0]["steps"]) == 1


def test_disabled_mode_hooks_nothing():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    mon = layerwatch.watch(model, mode="disabled")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    mon.step(loss=1.0)
    mon.close()


def test_on_alert_runs_on_the_training_thread(collector, tmp_path):
    collector.alerts = [
        {
            "id": "a1",
            "rule": "dead_units",
            "state": "firing",
            "severity": "warning",
            "layer": "1",
            "step": 3,
            "value": 0.9,
            "threshold": 0.5,
            "message": "dead",
        }
    ]
    seen: list[tuple[str, str]] = []
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    mon = layerwatch.watch(
        model, url=collector.url, every=1, on_alert=lambda a: seen.append((a.rule, threading.current_thread().name))
    )
    for _ in range(50):
        model(torch.randn(2, 2)).sum().backward()
        mon.step()
        if seen:
            break
        threading.Event().wait(0.05)
    mon.close()
    assert seen and seen[0] == ("dead_units", threading.main_thread().name)
    assert [a.rule for a in mon.alerts] == ["dead_units"]
    assert mon.alerts[0].threshold == 0.5 and not math.isnan(mon.alerts[0].value)
