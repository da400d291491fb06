"""No alert on healthy runs of models written outside this repository (issue #11): each model of
tests/client/real_models.py learns a small fixed data set for 50 steps, reporting to one real collector with the
default rules, and the collector keeps quiet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.client.real_models import CASES

from .conftest import sgd_step, train

pytest.importorskip("transformers")

STEPS, EVERY, BATCHES, BATCH = 50, 5, 4, 8
VOCAB = 64  # every token model of real_models.py has 64 tokens


def _tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, 8))
    return {"input_ids": ids, "labels": ids.clone()}


def _images(size: int, labels: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 3, size, size), "labels": torch.randint(0, labels, (BATCH,))}


def _hf(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _copy_tokens(model: nn.Module, batch: dict[str, torch.Tensor], time_first: bool = False) -> torch.Tensor:
    """Predict each token from the sequence (the torch models' heads give per-token logits)."""
    logits, ids = model(batch["input_ids"]), batch["labels"]
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), (ids.T if time_first else ids).reshape(-1))


def _classify(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])


# name -> (a batch of the model's data, its loss); the models are real_models.CASES[name].build()
DATA: dict[str, tuple[Callable[[], dict[str, torch.Tensor]], Callable[[nn.Module, Any], torch.Tensor]]] = {
    "gpt2": (_tokens, _hf),
    "bert": (_tokens, _hf),
    "llama": (_tokens, _hf),
    "t5": (_tokens, _hf),
    "vit": (lambda: _images(16, 3), _hf),
    "resnet": (lambda: _images(32, 3), _hf),
    "convnext": (lambda: _images(32, 3), _hf),
    "transformer_encoder": (_tokens, _copy_tokens),
    "lstm": (_tokens, lambda m, b: _copy_tokens(m, b, time_first=True)),  # its GRU runs time-first
    "inplace_cnn": (lambda: _images(8, 10), _classify),
}


def test_every_real_model_is_covered():
    assert DATA.keys() == CASES.keys()


@pytest.mark.parametrize("name", list(CASES))
def test_healthy_run_raises_no_alert(collector, name):
    torch.manual_seed(0)
    model = CASES[name].build()
    make_batch, loss = DATA[name]
    batches = [make_batch() for _ in range(BATCHES)]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses: list[float] = []

    def loss_of(i: int) -> torch.Tensor:
        value = loss(model, batches[i % BATCHES])
        losses.append(value.item())
        return value

    alerts, _ = train(collector, model, sgd_step(model, opt, loss_of), STEPS, f"quiet-{name}", every=EVERY)
    first, last = sum(losses[:BATCHES]) / BATCHES, sum(losses[-BATCHES:]) / BATCHES
    assert last < first, f"{name} did not learn its {BATCHES} batches: loss {first:.3f} -> {last:.3f}"
    described = [f"{a['rule']} {a['state']} at step {a['step']} on {a['layer']!r}: {a.get('message')}" for a in alerts]
    assert alerts == [], f"{name}: {described}"
