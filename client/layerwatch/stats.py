"""Statistics as pure tensor functions: no hooks, no I/O, no host synchronisation.

On the device each watched activation is reduced to a few *raw sums* (single-pass float reductions); the
ratios users read (mean, std, fractions) are formed later on the host from those sums, once per report.
That split keeps the training step to a handful of reductions per layer and makes the figures exact to
combine across calls of one module within a step.

Only float arithmetic and float reductions are used: on CPU, boolean predicates and counting norms
(``count_nonzero``, ``isfinite().sum()``, ``vector_norm(ord=0 or inf)``) measured 10-50x a ``sum()`` of the
same tensor, so counts are formed as ``nansum()`` of one float expression instead (1 + 0*x, x / x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Columns of one raw activation record, as kept on the device.
RAW_SUM, RAW_SUMSQ, RAW_MAX, RAW_MIN, RAW_FINITE, RAW_NONZERO, RAW_SAT = range(7)
RAW_WIDTH = 7
# Blocks of one step's raw parameter record.
P_GRAD_NORM, P_GRAD_MAX, P_GRAD_MIN, P_WEIGHT_NORM, P_GRAD_FINITE = range(5)
PARAM_WIDTH = 5

_F32 = torch.float32


def _count_finite(t: torch.Tensor, acc: torch.dtype = _F32) -> torch.Tensor:
    # 1 + 0*x is 1 where x is finite and NaN where it is NaN or Inf; nansum skips the NaNs.
    # (x - x + 1 is the same value but x - x with aliased inputs takes a slow path on CPU.)
    return torch.add(_one(t), t, alpha=0).nansum(dtype=acc)


_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _one(t: torch.Tensor) -> torch.Tensor:
    key = (t.device, t.dtype)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), device=t.device, dtype=t.dtype)
    return one


@torch.no_grad()
def activation_raw(
    a: torch.Tensor,
    unit_dim: int,
    eps: float,
    sat: tuple[float, float] | None,
    out: torch.Tensor,
    nonneg: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reduce one activation into ``out`` (RAW_WIDTH,) and return its per-unit (max, min), (units,) each.

    ``nonneg``: the module's outputs are never negative, so the minimum is not computed (it is returned as
    None and recorded as 0).

    Columns: sum, sum of squares, max, min, finite count, count of finite |a| > eps, count of saturated
    elements (|a - center| > threshold for ``sat`` = (center, threshold); a placeholder when None).
    """
    if a.dim() == 0:
        a = a.reshape(1)
    dims = [d for d in range(a.dim()) if d != unit_dim % a.dim()]
    unit_max = a.amax(dim=dims) if dims else a  # (units,)
    unit_min = None if nonneg else (a.amin(dim=dims) if dims else a)  # (units,)
    acc = a.dtype if a.dtype in (torch.float32, torch.float64) else _F32  # half types accumulate in fp32
    flat = a.reshape(-1)
    if a.dtype == acc and flat.is_contiguous():
        sumsq = torch.dot(flat, flat)
    else:
        sumsq = torch.linalg.vector_norm(a, 2, dtype=acc).square()
    finite = _count_finite(a, acc)
    if eps > 0:
        nonzero = ((a.abs() > eps) & torch.isfinite(a)).sum(dtype=acc)
    else:
        nonzero = torch.div(a, a).nansum(dtype=acc)  # x/x is 1 where x is finite and non-zero, else NaN
    if sat is None:
        saturated = finite
    else:
        center, threshold = sat
        distance = (a - center).abs_() if center else a.abs()
        saturated = distance.sub_(threshold).clamp_(min=0).sign_().nansum(dtype=acc)
    low = unit_min.min() if unit_min is not None else torch.zeros((), device=a.device, dtype=a.dtype)
    parts = (a.sum(dtype=acc), sumsq, unit_max.max(), low, finite, nonzero, saturated)
    if acc != _F32 or a.dtype != _F32:
        parts = tuple(p.to(_F32) for p in parts)
    torch.stack(parts, out=out)
    return unit_max, unit_min


@torch.no_grad()
def grad_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The every-step parameter record: each gradient's L2 norm, (P,) float32, one fused multi-tensor kernel.
    A NaN/Inf anywhere in a gradient makes its norm non-finite, so this alone catches non-finite gradients."""
    return torch.stack([t.to(_F32) for t in torch._foreach_norm(grads, 2)])


@torch.no_grad()
def param_raw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Raw per-parameter records, (PARAM_WIDTH * P,) float32, as blocks of P values each:
    [grad_norm, grad_max, grad_min, weight_norm, grad_finite_count]. L2 norms use the fused
    multi-tensor kernel; the rest is one pass per gradient, so temporaries stay one gradient in size."""
    grad_norms = torch._foreach_norm(grads, 2)
    weight_norms = torch._foreach_norm(params, 2)
    extremes = [torch.aminmax(g) for g in grads]
    finite = [_count_finite(g, g.dtype if g.dtype == torch.float64 else _F32) for g in grads]
    parts = (*grad_norms, *(high for _, high in extremes), *(low for low, _ in extremes), *weight_norms, *finite)
    return torch.stack([t.to(_F32) for t in parts])


def finalize_activation(raw: Sequence[float], n: int, bounded: bool) -> dict[str, float | None]:
    """Host-side: turn a raw record over n elements into the wire statistics (all but dead_frac)."""
    total, sumsq, high, low, finite, nonzero, saturated = raw
    mean = total / n
    if not (math.isfinite(sumsq) and math.isfinite(mean)):
        std = math.nan
    elif n > 1:
        std = math.sqrt(max(sumsq / n - mean * mean, 0.0) * n / (n - 1))
    else:
        std = 0.0
    return {
        "act_mean": mean,
        "act_std": std,
        "act_max_abs": max(high, -low) if not (math.isnan(high) or math.isnan(low)) else math.nan,
        "zero_frac": (finite - nonzero) / n,
        "sat_frac": saturated / n if bounded else None,
        "nonfinite": float(round(n - finite)),
    }


def merge_raw(into: torch.Tensor, new: torch.Tensor) -> None:
    """Combine a second call of the same layer in one step into its record (counts add, extremes extend)."""
    high = torch.maximum(into[RAW_MAX], new[RAW_MAX])
    low = torch.minimum(into[RAW_MIN], new[RAW_MIN])
    into.add_(new)
    into[RAW_MAX] = high
    into[RAW_MIN] = low
