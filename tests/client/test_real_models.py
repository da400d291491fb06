"""layerwatch on models written outside this repository: Hugging Face transformers (tiny configs, random
weights), nn.TransformerEncoder, RNNs, an in-place-ReLU ResNet-style CNN; checkpointing, autocast, and the
warning when nothing watched runs."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import layerwatch
from layerwatch import layers as lw_layers
from tests.client.real_models import CASES, STEPS, WINDOW, Capture, compare, expected_rows, reported_rows, train

pytest.importorskip("transformers")


def watch(model: nn.Module, tmp_path, **kwargs) -> layerwatch.Monitor:
    return layerwatch.watch(model, mode="offline", spool_dir=str(tmp_path), every=STEPS, window=WINDOW, **kwargs)


def base_name(layer: str) -> str:
    return re.sub(r"#\d+$", "", layer)


@pytest.mark.parametrize("name", list(CASES))
def test_every_projection_and_activation_is_watched_and_matches_brute_force(name, tmp_path):
    case = CASES[name]
    model = case.build()
    capture = Capture(case)
    capture.attach(model)
    mon = watch(model, tmp_path)
    train(model, case, capture, mon)
    mon.close()

    reported, layers = reported_rows(tmp_path)
    assert {base_name(layer) for layer in layers} <= {n for n, _ in model.named_modules()}
    ran = {n for calls in capture.steps for n, _, _ in calls}
    assert ran <= set(layers), f"run but not watched: {sorted(ran - set(layers))}"
    for fragment in case.mlp:
        assert any(fragment in layer for layer in layers), f"no layer named like {fragment!r}: {sorted(layers)}"
    assert compare(expected_rows(capture), reported) == []


def test_recurrent_units_are_hidden_size_per_direction_and_attention_is_named_out_proj(tmp_path):
    model = CASES["lstm"].build()
    mon = watch(model, tmp_path)
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    mon.close()
    _, layers = reported_rows(tmp_path)
    assert layers["lstm"]["units"] == 24 and layers["lstm"]["kind"] == "bounded"  # 12 per direction
    assert layers["gru"]["units"] == 6

    encoder = CASES["transformer_encoder"].build()
    names = [spec.name for _, spec in lw_layers.select(encoder, None)]
    assert "encoder.layers.0.self_attn.out_proj" in names


def test_a_packed_sequence_is_measured_on_its_data(tmp_path):
    model = nn.Sequential(nn.LSTM(4, 5))
    mon = watch(model, tmp_path)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(6, 3, 4), [6, 4, 2])
    out, _ = model(packed)
    out.data.sum().backward()
    mon.close()
    _, layers = reported_rows(tmp_path)
    assert layers["0"]["shape"] == [12, 5] and layers["0"]["units"] == 5  # 6 + 4 + 2 steps, no padding


def test_types_registered_by_the_user_are_watched_with_their_kind(tmp_path):
    class Squash(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Squash())
    assert [spec.name for _, spec in lw_layers.select(model, None)] == ["0"]
    layerwatch.register_type(Squash, kind="bounded", bounds=(-2.0, 2.0))
    try:
        mon = watch(model, tmp_path)
        with torch.no_grad():
            model[0].weight.mul_(100)
        model(torch.randn(8, 4)).sum().backward()
        mon.step()
        mon.close()
    finally:
        lw_layers._registered.pop(Squash)
    reported, layers = reported_rows(tmp_path)
    assert layers["1"]["kind"] == "bounded" and reported[(0, "1")]["sat_frac"] > 0.5
    with pytest.raises(ValueError, match="unknown kind"):
        layerwatch.register_type(Squash, kind="squashy")
    with pytest.raises(ValueError, match="bounds"):
        layerwatch.register_type(Squash, kind="bounded")
    # types= as a mapping names the kind for this monitor only
    specs = {spec.name: spec for _, spec in lw_layers.select(model, {nn.Linear: "linear", Squash: "gelu"})}
    assert specs["1"].kind == "other" and specs["0"].kind == "relu"


def test_transformers_types_are_recognised_without_importing_transformers():
    import subprocess
    import sys

    code = (
        "import sys, torch, layerwatch.layers as L\n"
        "L.select(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU()), None)\n"
        "assert 'transformers' not in sys.modules, 'layerwatch imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _same_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for stat, value in a[key].items():
            other = b[key][stat]
            assert (value is None) == (other is None), (key, stat)
            if value is not None:
                assert value == pytest.approx(other, rel=1e-4, abs=1e-6), (key, stat)


def _train_gpt2(tmp_path, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    case = CASES["gpt2"]
    model = case.build()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    mon = watch(model, tmp_path)
    torch.manual_seed(1)
    train(model, case, Capture(case), mon)
    mon.close()
    return reported_rows(tmp_path)[0]


def test_gradient_checkpointing_records_each_forward_once(tmp_path):
    plain = _train_gpt2(tmp_path / "plain", checkpointing=False)
    checkpointed = _train_gpt2(tmp_path / "checkpointed", checkpointing=True)
    _same_stats(plain, checkpointed)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_is_not_recorded_twice(tmp_path, reentrant):
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, x, use_reentrant=reentrant)

    model = Checkpointed()
    mon = watch(model, tmp_path)
    model(torch.randn(3, 4, requires_grad=True)).sum().backward()
    assert mon.recorder.current.elements == {0: 24, 1: 24, 2: 12}  # one forward's worth each
    mon.close()


def test_bf16_autocast_gradient_accumulation_and_frozen_layers(tmp_path):
    model = CASES["inplace_cnn"].build()
    model.stem[0].requires_grad_(False)
    mon = watch(model, tmp_path)
    for _ in range(STEPS):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(torch.randn(2, 3, 8, 8)).float().square().mean()
            loss.backward()
        mon.step(loss=loss)
        model.zero_grad()
    mon.close()
    reported, layers = reported_rows(tmp_path)
    assert {"stem.0", "stem.2", "blocks.0.relu", "head"} <= set(layers)
    assert reported[(0, "head")]["act_mean"] is not None
    assert all(v is None or v == v for stats in reported.values() for v in stats.values())  # no NaN


def test_a_warning_names_the_likely_reason_when_no_watched_module_runs(tmp_path, caplog):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = watch(model, tmp_path)
    trained = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # e.g. a wrapper that rebuilt the model after watch()
    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        for _ in range(3):
            trained(torch.randn(2, 4)).sum().backward()
            mon.step()
    mon.close()
    messages = [r.getMessage() for r in caplog.records if "none of 2 watched modules ran" in r.getMessage()]
    assert len(messages) == 1 and "not the module given to watch()" in messages[0]

    with caplog.at_level(logging.WARNING, logger="layerwatch"):
        mon = watch(model, tmp_path / "nomatch", include=["encoder.*"])
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
        mon.close()
    assert any("no module matched" in r.getMessage() for r in caplog.records)
