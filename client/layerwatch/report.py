"""One report interval, copied to the host: its layout, and its translation into wire statistics.

The training thread packs a report's device tensors into one flat buffer (one device-to-host copy) and
notes on the host what each span means; the exporter thread turns the numbers into ``steps`` of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from layerwatch import stats, wire
from layerwatch.histograms import Snapshot
from layerwatch.recorder import StepCalls
from layerwatch.tripwire import MIN_LOSS_SCALE


@dataclass
class StepMeta:
    step: int
    time: float
    calls: StepCalls
    params: list[int] = field(default_factory=list)  # indices of parameters that had a gradient
    full_params: bool = False  # all parameter statistics this step, or only gradient norms
    tensor_scalars: list[str] = field(default_factory=list)  # names of values packed on the device
    host_scalars: dict[str, float] = field(default_factory=dict)  # values given as Python numbers
    rank_grad: bool = False  # this rank's own squared gradient norm follows the tensor scalars (DDP, combined ranks)
    rank_grad_norm: float | None = None  # its square root, read from the buffer by translate()


@dataclass
class Report:
    """What a report carries besides its numbers. Spans in the flat buffer, in order:
    raw activation sums (layers x steps x RAW_WIDTH), one dead_frac vector per window that ended
    (layers each), then per step its parameter block (PARAM_WIDTH x params on a full step, else the gradient
    norms alone), its tensor scalars and this rank's own squared gradient norm (``rank_grad``); last, for each
    ``activity`` entry, a window's units active on this rank, packed by :func:`stats.pack_bits`."""

    steps: list[StepMeta]
    layers: list[dict[str, Any]]
    bounded: list[bool]
    dead_windows: list[tuple[int, list[bool]]]  # (position of the step in `steps`, layer was called)
    param_numel: list[int]
    flat: torch.Tensor | None  # host copy (pinned where CUDA is present)
    ready: Any = None  # a CUDA event recorded after the copy, or None when the copy was synchronous
    end: str | None = None  # final status when this is the run's last report
    histograms: list[Snapshot] = field(default_factory=list)  # histogram steps of the interval (rank 0 only)
    combine: bool = False  # a regular report of a job whose ranks combine their reports (see layerwatch.ranks)
    # This rank's interval so far, sent as a tripwire trips in a job whose ranks combine their reports: the
    # collector judges its rows but does not store them (the regular report carries the same steps, combined).
    preview: bool = False
    # Words of each dead-unit window's packed unit activity, to be OR-ed across ranks (layerwatch.ranks); empty:
    # the windows' dead_frac is this rank's own (no torch.distributed, the run's last report, a preview).
    activity: list[int] = field(default_factory=list)


def translate(report: Report, values: list[float], weight_norms: dict[int, float]) -> list[dict[str, Any]]:
    """The wire ``steps`` of a report from its flat values.

    ``weight_norms`` carries each parameter's latest weight norm from report to report: between full steps
    ``update_ratio`` is estimated as lr * grad_norm / (that norm), which moves by ~update_ratio per step.
    """
    n_layers, n_steps = len(report.layers), len(report.steps)
    raw_width = stats.RAW_WIDTH
    cursor = n_layers * n_steps * raw_width if n_layers else 0
    raw = values[:cursor]
    dead_at: dict[int, list[float | None]] = {}
    for position, called in report.dead_windows:
        chunk = values[cursor : cursor + n_layers]
        cursor += n_layers
        dead_at[position] = [d if was_called else None for d, was_called in zip(chunk, called, strict=True)]

    out = []
    for position, meta in enumerate(report.steps):
        layer_rows = []
        dead = dead_at.get(position)
        for index in meta.calls.order:
            start = (index * n_steps + position) * raw_width
            row = stats.finalize_activation(
                raw[start : start + raw_width], meta.calls.elements[index], report.bounded[index]
            )
            row["dead_frac"] = dead[index] if dead is not None else None
            layer_rows.append([index, *(row[name] for name in wire.LAYER_STATS)])
        if dead is not None:  # layers that did not run this step still close their window
            ran = set(meta.calls.order)
            for index, value in enumerate(dead):
                if index not in ran and value is not None:
                    layer_rows.append([index, *(value if s == "dead_frac" else None for s in wire.LAYER_STATS)])

        k = len(meta.params)
        width = stats.PARAM_WIDTH if meta.full_params else 1
        block = values[cursor : cursor + width * k]
        cursor += width * k
        scalars = dict(meta.host_scalars)
        for name in meta.tensor_scalars:
            scalars[name] = values[cursor]
            cursor += 1
        if meta.rank_grad:
            meta.rank_grad_norm = math.sqrt(values[cursor])
            cursor += 1
        lr = scalars.pop("lr", None)
        loss = scalars.pop("loss", None)
        param_rows = []
        for j, index in enumerate(meta.params):
            grad_norm = block[j]
            grad_max = weight_norm = nonfinite = None
            if meta.full_params:
                high, low, weight_norm, finite = (block[c * k + j] for c in range(1, stats.PARAM_WIDTH))
                grad_max = max(high, -low) if not (math.isnan(high) or math.isnan(low)) else math.nan
                nonfinite = float(round(report.param_numel[index] - finite))
                weight_norms[index] = weight_norm
            latest = weight_norms.get(index)
            ratio = lr * grad_norm / latest if lr is not None and latest else None
            param_rows.append([index, grad_norm, grad_max, weight_norm, ratio, nonfinite])
        grad_total = math.sqrt(sum(row[1] * row[1] for row in param_rows)) if param_rows else None
        if "loss_scale" in scalars:  # a GradScaler's step: whether it overflowed (and the scaler skipped it)
            scalars["overflow"] = float(_overflowed(loss, layer_rows, param_rows))
        out.append(
            {
                "step": meta.step,
                "time": meta.time,
                "loss": loss,
                "lr": lr,
                "grad_norm_total": grad_total,
                "scalars": scalars,
                "layers": layer_rows,
                "params": param_rows,
            }
        )
    return out


_NONFINITE = wire.LAYER_STATS.index("nonfinite") + 1
_MEAN = wire.LAYER_STATS.index("act_mean") + 1


def _shows_nonfinite(row: list) -> bool:
    """A layer row with a NaN/Inf element: counted, or (before counting began) seen in its sum."""
    count, mean = row[_NONFINITE], row[_MEAN]
    return bool(count) if count is not None else mean is not None and not math.isfinite(mean)


def uncounted_nonfinite(steps: list[dict[str, Any]]) -> bool:
    """Whether some layer showed a NaN/Inf that was not counted element by element (see Recorder)."""
    return any(row[_NONFINITE] is None and _shows_nonfinite(row) for step in steps for row in step["layers"])


def _overflowed(loss: float | None, layers: list[list], params: list[list]) -> bool:
    """A GradScaler's overflow: non-finite gradients, while the loss and the activations are finite."""
    if (loss is not None and not math.isfinite(loss)) or any(_shows_nonfinite(row) for row in layers):
        return False
    return any(not math.isfinite(row[1]) for row in params)


def skipped_by_scaler(step: dict[str, Any]) -> bool:
    """A GradScaler's overflow at a healthy loss scale: the scaler skipped the step; no NaN/Inf incident."""
    scalars = step["scalars"]
    return scalars.get("overflow") == 1.0 and scalars.get("loss_scale", 0.0) >= MIN_LOSS_SCALE


def first_nonfinite(steps: list[dict[str, Any]], layer_names: list[str], param_names: list[str], rank: int):
    """Where the first NaN/Inf of these steps appeared: forward activations in execution order, then the
    loss, then gradients in backward order (parameters of the last layers first)."""
    grad_nonfinite = wire.PARAM_STATS.index("grad_nonfinite") + 1
    for step in steps:
        if skipped_by_scaler(step):
            continue
        for row in step["layers"]:  # rows are in forward execution order
            if _shows_nonfinite(row):
                return {"step": step["step"], "pass": "forward", "layer": layer_names[row[0]], "rank": rank}
        loss = step["loss"]
        if loss is not None and not math.isfinite(loss):
            return {"step": step["step"], "pass": "loss", "layer": None, "rank": rank}
        for row in sorted(step["params"], key=lambda r: -r[0]):
            if row[grad_nonfinite] or not math.isfinite(row[1]):  # counted on full steps, norms every step
                return {"step": step["step"], "pass": "backward", "layer": param_names[row[0]], "rank": rank}
    return None
