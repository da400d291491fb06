"""Models people train, built from tiny configs with random weights (nothing downloaded), and a brute-force
check of what layerwatch reports for them against their activations, captured by the test's own hooks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.client.conftest import read_spool

STEPS, WINDOW = 4, 2


@dataclass
class Case:
    """A model, a batch maker, and which of its modules the test itself expects to see recorded."""

    build: Callable[[], nn.Module]
    batch: Callable[[], dict[str, torch.Tensor] | torch.Tensor]
    mlp: tuple[str, ...]  # name fragments every MLP projection/activation of the model has
    channels_first_acts: bool = True  # 4-D activation outputs have their units in dim 1


def hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    out = model(batch)
    return out.float().square().mean()


def _tokens(vocab: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 8))
    return {"input_ids": ids, "labels": ids.clone()}


def _images(size: int, labels: int = 3) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, size, size), "labels": torch.randint(0, labels, (2,))}


def gpt2() -> nn.Module:
    import transformers as T

    config = T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    import transformers as T

    config = T.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
    )
    return T.BertForMaskedLM(config)


def llama() -> nn.Module:
    import transformers as T

    config = T.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=16,
    )
    return T.LlamaForCausalLM(config)


def t5() -> nn.Module:
    import transformers as T

    config = T.T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=64)
    config.decoder_start_token_id = 0
    return T.T5ForConditionalGeneration(config)


def vit() -> nn.Module:
    import transformers as T

    config = T.ViTConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
    )
    config.num_labels = 3
    return T.ViTForImageClassification(config)


def hf_resnet() -> nn.Module:
    import transformers as T

    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    config.num_labels = 3
    return T.ResNetForImageClassification(config)


def convnext() -> nn.Module:
    import transformers as T

    config = T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    config.num_labels = 3
    return T.ConvNextForImageClassification(config)


class Encoder(nn.Module):
    """nn.TransformerEncoder with a GELU module as its MLP activation."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=nn.GELU(), batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class Recurrent(nn.Module):
    """A two-layer bidirectional LSTM and a GRU over token embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(24, 6)
        self.head = nn.Linear(6, 64)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        out, _ = self.gru(out.transpose(0, 1))
        return self.head(out)


class BasicBlock(nn.Module):
    """ResNet's basic block with one in-place ReLU module used twice, as torchvision writes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ConvNet(nn.Module):
    """Conv-BatchNorm-ReLU stem, two residual blocks, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


CASES: dict[str, Case] = {
    "gpt2": Case(gpt2, _tokens, ("mlp.c_fc", "mlp.act", "mlp.c_proj")),
    "bert": Case(bert, _tokens, ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense")),
    "llama": Case(llama, _tokens, ("mlp.gate_proj", "mlp.up_proj", "mlp.act_fn", "mlp.down_proj")),
    "t5": Case(t5, _tokens, ("DenseReluDense.wi", "DenseReluDense.act", "DenseReluDense.wo")),
    "vit": Case(vit, lambda: _images(16), ("mlp.fc1", "mlp.activation_fn", "mlp.fc2")),
    "resnet": Case(hf_resnet, lambda: _images(32), ("shortcut", "layer.0.convolution", "layer.0.activation")),
    "convnext": Case(convnext, lambda: _images(32), ("pwconv1", "act", "pwconv2"), channels_first_acts=False),
    "transformer_encoder": Case(Encoder, lambda: torch.randint(0, 64, (2, 8)), ("linear1", "activation", "linear2")),
    "lstm": Case(Recurrent, lambda: torch.randint(0, 64, (2, 8)), ("lstm", "gru")),
    "inplace_cnn": Case(ConvNet, lambda: torch.randn(2, 3, 8, 8), ("stem.0", "stem.2", "conv1", "relu")),
}


# -- the test's own view of the modules: which it expects watched, and what their units and activity are ----
def _expected_types() -> tuple[type, ...]:
    import transformers.activations as acts
    from transformers.pytorch_utils import Conv1D

    hf = tuple(getattr(acts, n) for n in ("GELUActivation", "NewGELUActivation", "SiLUActivation"))
    torch_types = (nn.Linear, nn.Conv2d, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.LSTM, nn.GRU, nn.MultiheadAttention)
    return (Conv1D, *torch_types, *hf)


def _positive(module: nn.Module) -> bool:
    """Active means > 0 (ReLU family and pre-activation outputs), else |a| > 0."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | nn.Conv2d | nn.ReLU | nn.MultiheadAttention | Conv1D)


@dataclass
class Capture:
    """Outputs of the expected modules in training forwards, per step: [(name, module, tensor), ...]."""

    case: Case
    steps: list[list[tuple[str, nn.Module, torch.Tensor]]] = field(default_factory=lambda: [[]])
    handles: list = field(default_factory=list)

    def attach(self, model: nn.Module) -> None:
        types = _expected_types()
        for name, module in model.named_modules():
            if not isinstance(module, types):
                continue
            if isinstance(module, nn.Linear) and name.endswith("out_proj"):
                continue  # called by MultiheadAttention as a function, never as a module
            label = f"{name}.out_proj" if isinstance(module, nn.MultiheadAttention) else name
            self.handles.append(module.register_forward_hook(self._hook(label)))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
                return
            out = output[0] if isinstance(output, tuple) else output
            self.steps[-1].append((name, module, out.detach().float().clone()))

        return hook

    def next_step(self) -> None:
        self.steps.append([])

    def unit_dim(self, module: nn.Module, a: torch.Tensor) -> int:
        if isinstance(module, nn.Conv2d):
            return 1
        if a.dim() == 4 and self.case.channels_first_acts and not isinstance(module, nn.Linear):
            return 1
        return a.dim() - 1


def expected_rows(capture: Capture) -> dict[tuple[int, str], dict[str, float]]:
    """Brute force: per (step, layer name) the statistics from the captured outputs, layers split by width as
    layerwatch names them (name, name#1, ...) and dead_frac at each window's last step."""
    widths: dict[str, list[int]] = {}
    rows: dict[tuple[int, str], dict[str, float]] = {}
    window: dict[str, tuple[torch.Tensor, bool]] = {}
    for step, calls in enumerate(capture.steps[:STEPS]):
        merged: dict[str, list[torch.Tensor]] = {}
        for name, module, a in calls:
            dim = capture.unit_dim(module, a)
            units = a.shape[dim]
            known = widths.setdefault(name, [])
            if units not in known:
                known.append(units)
            layer = name if known.index(units) == 0 else f"{name}#{known.index(units)}"
            merged.setdefault(layer, []).append(a.reshape(-1))
            active = (a > 0) if _positive(module) else (a != 0)
            per_unit = active.movedim(dim, -1).reshape(-1, units).any(0)
            seen, positive = window.get(layer, (torch.zeros(units, dtype=torch.bool), _positive(module)))
            window[layer] = (seen | per_unit, positive)
        for layer, parts in merged.items():
            a = torch.cat(parts).double()
            rows[(step, layer)] = {
                "act_mean": a.mean().item(),
                "act_std": a.std().item() if a.numel() > 1 else 0.0,
                "act_max_abs": a.abs().max().item(),
                "zero_frac": (a == 0).double().mean().item(),
            }
        if (step + 1) % WINDOW == 0:
            for layer, (seen, _) in window.items():
                rows.setdefault((step, layer), {})["dead_frac"] = 1.0 - seen.double().mean().item()
            window.clear()
    return rows


def reported_rows(spool: Path) -> tuple[dict[tuple[int, str], dict[str, Any]], dict[str, dict[str, Any]]]:
    """(step, layer name) -> reported statistics, and layer name -> its description."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    layers: dict[str, dict[str, Any]] = {}
    for batch in read_spool(spool):
        names = {entry["index"]: entry["name"] for entry in batch["layers"]}
        layers.update({entry["name"]: entry for entry in batch["layers"]})
        for step in batch["steps"]:
            for row in step["layers"]:
                rows[(step["step"], names[row[0]])] = dict(zip(batch["layer_stats"], row[1:], strict=True))
    return rows, layers


def compare(expected: dict, reported: dict) -> list[str]:
    """Every statistic layerwatch reported, against the brute-force value; the mismatches, described."""
    problems = []
    for key, stats in reported.items():
        if key not in expected:
            problems.append(f"{key}: reported, but the test saw no such call")
            continue
        for stat, value in stats.items():
            if value is None or stat in ("nonfinite", "sat_frac"):
                continue
            if not math.isfinite(value):
                problems.append(f"{key} {stat} = {value}")
                continue
            if stat not in expected[key]:
                problems.append(f"{key} {stat} reported, not expected")
                continue
            want = expected[key][stat]
            scale = max(abs(expected[key].get("act_max_abs", 1.0)), 1e-6)
            if not math.isclose(value, want, rel_tol=2e-3, abs_tol=1e-5 * scale):
                problems.append(f"{key} {stat}: reported {value!r}, brute force {want!r}")
        if stats.get("nonfinite") not in (None, 0.0):
            problems.append(f"{key} nonfinite = {stats['nonfinite']}")
    for key, stats in expected.items():
        mine = reported.get(key, {})
        # (an output feeding an activation reports neither dead_frac nor zero_frac)
        if "dead_frac" in stats and mine.get("dead_frac") is None and mine.get("zero_frac") is not None:
            problems.append(f"{key}: dead_frac expected at the window's end")
    return problems


def train(model: nn.Module, case: Case, capture: Capture, monitor, forward=None, steps: int = STEPS) -> None:
    """A few optimiser steps; the capture and the monitor each mark the step's end."""
    forward = forward if forward is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [case.batch() for _ in range(steps)]
    model.train()
    for batch in batches:
        loss = hf_loss(forward, batch)
        loss.backward()
        monitor.step(loss=loss)
        capture.next_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
