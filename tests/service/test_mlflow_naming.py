"""MLflow key naming: what a layer's key says it is, and keys that stay the same across processes."""

from __future__ import annotations

import os
import subprocess
import sys

from layerwatch_server.mirrors.naming import MAX_KEY_LEN, SeriesDef, plan_keys, safe_key, shown_kinds


def _layers(*types_and_kinds: tuple[str, str]) -> list[SeriesDef]:
    return [SeriesDef(i, i, str(i), kind, 16, type_) for i, (type_, kind) in enumerate(types_and_kinds)]


def test_layers_of_an_mlp_are_keyed_as_what_they_are():
    mlp = _layers(("Linear", "relu"), ("ReLU", "relu"), ("Linear", "relu"), ("Tanh", "bounded"), ("Linear", "relu"))
    budget = plan_keys(mlp, [], ["dead_frac", "act_std"], [], max_keys=100)
    assert sorted(k for (i, stat), k in budget.layer_keys.items() if stat == "act_std") == [
        "bounded/3/act_std",
        "linear/0/act_std",
        "linear/2/act_std",
        "output/4/act_std",  # the output head: its dead_frac counts outputs never positive, not dead units
        "relu/1/act_std",
    ]


def test_conv_outputs_and_a_model_ending_in_an_activation():
    convnet = _layers(("Conv2d", "relu"), ("ReLU", "relu"), ("ConvTranspose2d", "relu"), ("Sigmoid", "bounded"))
    assert list(shown_kinds(convnet).values()) == ["conv", "relu", "conv", "bounded"]


_LONG = "relu/" + "encoder.layers.0.block." * 20 + "act/dead_frac"

_PRINT_KEY = f"from layerwatch_server.mirrors.naming import safe_key; print(safe_key({_LONG!r}))"


def test_a_shortened_key_is_the_same_in_every_process():
    """Two collector processes (replicas, or one before and after a restart) name a layer's series alike:
    different hash seeds, one key."""
    keys = {
        subprocess.run(
            [sys.executable, "-c", _PRINT_KEY],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert keys == {safe_key(_LONG)}
    key = keys.pop()
    assert len(key) == MAX_KEY_LEN and key.startswith("relu/encoder.layers.0.block.")
    assert safe_key(_LONG.replace("act/", "out/")) != key  # the digest covers the end cut off
