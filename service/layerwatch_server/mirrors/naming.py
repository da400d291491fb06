"""How layerwatch data is named and budgeted in MLflow (pure functions, no I/O).

MLflow's UI groups metric charts by the part of the key before the first ``/``, so per-layer keys are
``{kind}/{layer}/{stat}`` (``relu/blocks.3.act/dead_frac``, ``linear/blocks.3.fc/act_std``), parameters
``param/{name}/{stat}``, run-level aggregates ``layerwatch/{name}``; loss, lr, grad_norm_total and user scalars
keep their plain names. The kind in a key says what the layer is (:func:`shown_kinds`), not the wire's kind,
which says only how its units are judged (a Linear's is ``relu``).
MLflow slows down with thousands of keys per run, so per-layer keys are limited to a few statistics and a
key budget (layers in model order until it is spent); the aggregates keep a 200-layer model readable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from layerwatch_server.core.layers import PRE_ACTIVATIONS

MAX_KEY_LEN = 250  # MLflow's limit on metric/param/tag keys
MAX_PARAM_VALUE_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LEN = 8000
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :/]")

# layerwatch run status -> MLflow RunStatus name. A stalled run stopped reporting without saying goodbye:
# a crash, an OOM kill, a lost node: FAILED, with the reason in a tag.
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED", "stalled": "FAILED"}

AGG_DEAD_FRAC_MAX = "layerwatch/dead_frac_max"  # the worst layer's dead fraction
AGG_DEAD_UNITS_FRAC = "layerwatch/dead_units_frac"  # dead units / units, over every measured layer
AGG_GRAD_NORM_MAX = "layerwatch/grad_norm_max"  # the largest per-parameter gradient norm
AGG_NONFINITE_COUNT = "layerwatch/nonfinite_count"  # non-finite activations + gradients counted by the client
AGG_NONFINITE_VALUES = "layerwatch/nonfinite_values"  # statistics of this step that were NaN/Inf (not logged)


def safe_key(key: str) -> str:
    """A key MLflow accepts: unsupported characters become ``_``, at most 250 characters. A longer key keeps
    its start and ends in a digest of the whole key: the same on every replica and after every restart
    (Python's ``hash()`` of a string differs between processes)."""
    key = _UNSAFE.sub("_", key)
    if len(key) <= MAX_KEY_LEN:
        return key
    return key[: MAX_KEY_LEN - 9] + "~" + hashlib.sha256(key.encode()).hexdigest()[:8]


def layer_key(kind: str, layer: str, stat: str) -> str:
    return safe_key(f"{kind}/{layer}/{stat}")


def param_key(param: str, stat: str) -> str:
    return safe_key(f"param/{param}/{stat}")


@dataclass(frozen=True)
class SeriesDef:
    """A layer or parameter of the run as stored (``id`` is the DB id)."""

    id: int
    index: int
    name: str
    kind: str = "param"
    units: int = 0
    type: str = ""


# The MLflow run's description (the ``mlflow.note.content`` tag): how to read the keys, where MLflow shows it.
RUN_NOTE = (
    "Mirrored by layerwatch. Per-layer metrics are `{kind}/{layer}/{stat}`, with the layer named as in "
    "`model.named_modules()`: `relu`, `bounded` (tanh, sigmoid, ...) and `other` (GELU, SiLU, ...) are activation "
    "modules, `linear` and `conv` Linear/Conv outputs, `output` the model's output head, whose `dead_frac` is the "
    "share of outputs never positive, not dead units. Run-level figures are under `layerwatch/`, parameters "
    "under `param/`."
)
OUTPUT_KIND = "output"  # the model's last layer, a Linear/Conv: its dead_frac counts outputs never positive


def shown_kinds(layers: Iterable[SeriesDef]) -> dict[int, str]:
    """The kind shown for each layer (by id): ``linear`` or ``conv`` for a Linear/Conv output, ``output`` for
    the model's last layer when it is one (an output head: its dead_frac is no count of dead units, which is
    why the dead_units rule skips it), the wire kind (``relu``, ``bounded``, ``other``) for the rest."""
    ordered = sorted(layers, key=lambda d: (d.index, d.id))
    shown = {}
    for i, d in enumerate(ordered):
        if d.type not in PRE_ACTIVATIONS:
            shown[d.id] = d.kind
        elif i == len(ordered) - 1:
            shown[d.id] = OUTPUT_KIND
        else:
            shown[d.id] = "conv" if d.type.startswith("Conv") else "linear"
    return shown


@dataclass(frozen=True)
class Budget:
    """Which per-series keys a run gets: ``(series id, stat) -> key``; ``dropped`` counts the keys left out."""

    layer_keys: dict[tuple[int, str], str]
    param_keys: dict[tuple[int, str], str]
    dropped: int


def plan_keys(
    layers: Iterable[SeriesDef],
    params: Iterable[SeriesDef],
    layer_stats: Iterable[str],
    param_stats: Iterable[str],
    max_keys: int,
) -> Budget:
    """Per-layer keys for the chosen statistics, layers then parameters in model order, up to ``max_keys``."""
    layers = list(layers)
    kinds = shown_kinds(layers)
    layer_keys: dict[tuple[int, str], str] = {}
    param_keys: dict[tuple[int, str], str] = {}
    dropped = 0
    for defs, stats, out, name_of in (
        (sorted(layers, key=lambda d: (d.index, d.id)), list(layer_stats), layer_keys, None),
        (sorted(params, key=lambda d: (d.index, d.id)), list(param_stats), param_keys, "param"),
    ):
        for d in defs:
            for stat in stats:
                if len(layer_keys) + len(param_keys) >= max_keys:
                    dropped += 1
                    continue
                out[(d.id, stat)] = param_key(d.name, stat) if name_of else layer_key(kinds[d.id], d.name, stat)
    return Budget(layer_keys, param_keys, dropped)


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}``; lists as JSON. Values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[safe_key(key)] = text[:MAX_PARAM_VALUE_LEN]
    return out


# The client's model summary (layerwatch.monitor) -> param names; any other config key keeps its name.
_SUMMARY_KEYS = {
    "model": "model.class",
    "parameters": "model.parameters",
    "trainable_parameters": "model.trainable_parameters",
    "watched_modules": "model.watched_modules",
    "every": "layerwatch.every",
    "window": "layerwatch.window",
    "eps": "layerwatch.eps",
    "sat_margin": "layerwatch.sat_margin",
    "layerwatch": "layerwatch.version",
    "torch": "layerwatch.torch",
}


def run_params(
    config: Mapping[str, Any] | None, layers: list[dict[str, Any]], params: list[dict[str, Any]], max_params: int
) -> dict[str, str]:
    """MLflow params: the user's hyper-parameters by their own names, the model summary under ``model.``.

    The per-layer detail (types, shapes, units, parameter counts) goes into the ``model_summary.json``
    artifact instead: hundreds of params per run make MLflow's compare view unusable.
    """
    config = dict(config or {})
    hparams = config.pop("hparams", None) or {}
    out = flatten(hparams) if isinstance(hparams, Mapping) else {}
    for k, v in flatten(config).items():
        out.setdefault(_SUMMARY_KEYS.get(k, k), v)
    types: dict[str, int] = {}
    for layer in layers:
        types[layer["type"]] = types.get(layer["type"], 0) + 1
    out["model.watched_layers"] = str(len(layers))
    out["model.layer_types"] = ", ".join(f"{t}:{n}" for t, n in sorted(types.items()))[:MAX_PARAM_VALUE_LEN]
    out["model.watched_params"] = str(len(params))
    out["model.watched_param_numel"] = str(sum(int(p.get("numel") or 0) for p in params))
    return dict(list(out.items())[:max_params])


def model_summary(layers: list[dict[str, Any]], params: list[dict[str, Any]]) -> dict[str, Any]:
    """The full per-layer description, logged once as an artifact."""
    return {"layers": layers, "params": params}
