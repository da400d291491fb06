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


def _count_finite(t: torch.Tensor, acc: torch.dtype = _F32, temporary: torch.Tensor | None = None) -> torch.Tensor:
    # 1 + 0*x is 1 where x is finite and NaN where it is NaN or Inf; nansum skips the NaNs.
    # (x - x + 1 is the same value but x - x with aliased inputs takes a slow path on CPU.)
    return torch.add(_constant(t, 1.0), t, alpha=0, out=temporary).nansum(dtype=acc)


_CONSTANTS: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}


def _constant(t: torch.Tensor, value: float) -> torch.Tensor:
    """A cached 0-d tensor on ``t``'s device: creating one per call costs an allocation (and on CUDA a copy).
    Under torch.compile a fresh one: the compiler folds it, and a global cache would be a traced side effect."""
    if torch.compiler.is_compiling():
        return torch.full((), value, device=t.device, dtype=t.dtype)
    key = (t.device, t.dtype, repr(value))
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = torch.full((), value, device=t.device, dtype=t.dtype)
    return constant


class Scratch:
    """One reusable buffer per dtype for the elementwise temporaries of CPU activations.

    The CPU allocator hands large blocks back to the OS when they are freed, so a fresh temporary of
    activation size page-faults its way in again on every call: measured at 2-6x the arithmetic. CUDA's
    caching allocator reuses its blocks already, so there ``like`` answers None (allocate as usual).
    The buffer grows to the largest watched activation and lives as long as its owner (one recorder)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._views: dict[tuple[torch.dtype, torch.Size], torch.Tensor] = {}

    def like(self, t: torch.Tensor) -> torch.Tensor | None:
        if not t.is_cpu:
            return None
        view = self._views.get((t.dtype, t.shape))
        if view is not None:
            return view
        buffer = self._buffers.get(t.dtype)
        if buffer is None or buffer.numel() < t.numel():
            buffer = self._buffers[t.dtype] = torch.empty(t.numel(), dtype=t.dtype)
            self._views.clear()  # views of the old buffer
        elif len(self._views) > 64:
            self._views.clear()  # many shapes (variable sequence lengths): keep the cache small
        view = self._views[(t.dtype, t.shape)] = buffer.narrow(0, 0, t.numel()).view(t.shape)
        return view


def _per_unit(a: torch.Tensor, unit_dim: int, reduce) -> torch.Tensor:
    """``reduce`` (amax/amin/sum) over every dim but the unit dim. Channel units of a contiguous conv map reduce
    their spatial dims first, along memory: measured 1.1-1.5x faster than one reduction over (0, 2, 3)."""
    unit_dim %= a.dim()
    if unit_dim == 1 and a.dim() > 2 and a.is_contiguous():
        return reduce(reduce(a.flatten(2), 2), 0)
    dims = [d for d in range(a.dim()) if d != unit_dim]
    return reduce(a, dims) if dims else a


def activation_raw(
    a: torch.Tensor,
    unit_dim: int,
    eps: float,
    sat: tuple[float, float] | None,
    out: torch.Tensor,
    nonneg: bool = False,
    *,
    positive_only: bool = False,
    per_unit: bool = True,
    zeros: bool = True,
    count_finite: bool = True,
    known_max: torch.Tensor | None = None,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reduce one detached activation into ``out`` (RAW_WIDTH,); return its per-unit (max, min), (units,) each.

    Columns: sum, sum of squares, max, min, finite count, count of finite |a| > eps, count of saturated
    elements (|a - center| > threshold for ``sat`` = (center, threshold)). A column not measured holds NaN
    (a count never is NaN), and each flag below drops passes over the activation:

    - ``nonneg``: outputs are never negative, so no minimum is computed (recorded as 0).
    - ``positive_only``: active means > eps, so the per-unit minimum is not needed (returned as None).
    - ``per_unit=False``: no per-unit extremes at all (both returned as None), for an output whose units
      an activation module right after it measures already.
    - ``zeros=False``: no count of |a| > eps.
    - ``count_finite=False``: no finite count. A NaN or Inf element makes the sum non-finite, so a finite
      sum still proves the count is the element count; the host reads it that way (see finalize_activation).
    - ``known_max``: the maximum, known without a pass (a ReLU's is its input's, clamped at 0). For
      non-negative outputs and eps 0 (the caller's promise) a unit is active exactly when its sum is
      positive, so per-unit sums are returned in place of per-unit maxima and give the total too: one pass
      fewer.
    - ``scratch``: where elementwise temporaries go (see Scratch).
    """
    parts, unit_max, unit_min = _activation_parts(
        a, unit_dim, eps, sat, nonneg, positive_only, per_unit, zeros, count_finite, known_max, scratch
    )
    torch.stack(parts, out=out)
    return unit_max, unit_min


def activation_record(
    a: torch.Tensor,
    unit_dim: int,
    eps: float,
    sat: tuple[float, float] | None,
    nonneg: bool = False,
    *,
    positive_only: bool = False,
    count_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The torch.compile form of :func:`activation_raw`: (record, unit_max, unit_min), all fresh tensors.

    Nothing is written in place (a traced write into a buffer view is what aot_autograd refuses), so the
    compiler can fuse these reductions into the model's own kernels."""
    parts, unit_max, unit_min = _activation_parts(
        a, unit_dim, eps, sat, nonneg, positive_only, True, True, count_finite, None, None
    )
    assert unit_max is not None
    return torch.stack(parts), unit_max, unit_min


def _activation_parts(
    a: torch.Tensor,
    unit_dim: int,
    eps: float,
    sat: tuple[float, float] | None,
    nonneg: bool,
    positive_only: bool,
    per_unit: bool,
    zeros: bool,
    count_finite: bool,
    known_max: torch.Tensor | None,
    scratch: Scratch | None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None]:
    if a.dim() == 0:
        a = a.reshape(1)
    acc = a.dtype if a.dtype in (torch.float32, torch.float64) else _F32  # half types accumulate in fp32
    unit_max = unit_min = None
    total = None
    if known_max is not None and per_unit and nonneg and eps == 0 and a.dtype == acc:
        unit_max = _per_unit(a, unit_dim, torch.sum)  # (units,) sums: > 0 exactly where some element is
        high, low, total = known_max.to(a.dtype), _constant(a, 0.0), unit_max.sum(dtype=acc)
    elif per_unit:
        unit_max = _per_unit(a, unit_dim, torch.amax)  # (units,)
        high = unit_max.max()
        if not positive_only:
            unit_min = _per_unit(a, unit_dim, torch.amin)
            low = unit_min.min()
        else:
            low = _constant(a, 0.0) if nonneg else a.min()
    elif nonneg:
        high, low = a.max(), _constant(a, 0.0)
    else:
        low, high = torch.aminmax(a)
    flat = a.reshape(-1)
    if a.dtype == acc and flat.is_contiguous():
        sumsq = torch.dot(flat, flat)
    else:
        sumsq = torch.linalg.vector_norm(a, 2, dtype=acc).square()
    nan = _constant(a, math.nan)
    temporary = scratch.like(a) if scratch is not None else None
    finite = _count_finite(a, acc, temporary) if count_finite else nan
    if not zeros:
        nonzero = nan
    elif eps > 0:
        nonzero = ((a.abs() > eps) & torch.isfinite(a)).sum(dtype=acc)
    else:
        nonzero = torch.div(a, a, out=temporary).nansum(dtype=acc)  # x/x: 1 if finite and non-zero, else NaN
    if sat is None:
        saturated = nan
    else:
        center, threshold = sat
        distance = torch.sub(a, center, out=temporary).abs_() if center else torch.abs(a, out=temporary)
        saturated = distance.sub_(threshold).clamp_(min=0).sign_().nansum(dtype=acc)
    parts = (a.sum(dtype=acc) if total is None else total, sumsq, high, low, finite, nonzero, saturated)
    if acc != _F32 or a.dtype != _F32:
        parts = tuple(p.to(_F32) for p in parts)
    return parts, unit_max, unit_min


@torch.no_grad()
def grad_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The every-step parameter record: each gradient's L2 norm, (P,) float32.
    A NaN/Inf anywhere in a gradient makes its norm non-finite, so this alone catches non-finite gradients.

    On CUDA one fused multi-tensor kernel; on CPU ``_foreach_norm`` is a loop of per-tensor norms that
    measured 2x a loop of BLAS dot products, so contiguous float32 gradients take the dot (its float32 sum
    of squares reads a norm past ~1.8e19 as Inf: a gradient that large has exploded either way)."""
    if all(g.is_cpu and g.dtype == _F32 and g.is_contiguous() for g in grads):
        flats = [g.reshape(-1) for g in grads]
        return torch.stack([torch.dot(f, f) for f in flats]).sqrt_()
    return torch.stack([t.to(_F32) for t in torch._foreach_norm(grads, 2)])


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 sum of the squares of ``t`` (a squared L2 norm, kept squared so that parts add up): a BLAS
    dot on CPU for contiguous float32 (as :func:`grad_norms`), else a float32-accumulated norm, squared."""
    flat = t.reshape(-1)
    if flat.is_cpu and flat.dtype == _F32:
        return torch.dot(flat, flat)
    wide = flat.dtype.itemsize >= 4  # half and bfloat16 accumulate in float32
    return torch.linalg.vector_norm(flat, dtype=None if wide else _F32).square().to(_F32)


BITS_PER_WORD = 16  # mask bits packed in one float32 word: sums of distinct powers of two below 2**24 are exact


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as (ceil(n / 16),) float32 words, bit i of word w holding mask[16 * w + i]: a 32nd the size of
    one float per unit, and it travels in a report's float32 buffer as it is. On the mask's device, no host read."""
    pad = -mask.numel() % BITS_PER_WORD
    bits = torch.cat([mask, mask.new_zeros(pad)]) if pad else mask
    shifts = torch.arange(BITS_PER_WORD, device=mask.device, dtype=torch.int32)
    return (bits.view(-1, BITS_PER_WORD).to(torch.int32) << shifts).sum(1, dtype=torch.int32).to(_F32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of :func:`pack_bits`'s words (float or integer), as a bool mask."""
    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int64)
    return ((words.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()


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


@torch.no_grad()
def param_partial(
    params: Sequence[torch.Tensor] | None, grads: Sequence[torch.Tensor], owners: Sequence[bool]
) -> torch.Tensor:
    """A rank's part of the parameter record of sharded parameters, from its local shards: (PARAM_WIDTH * P,)
    as blocks of P values, [grad sum of squares, grad max, grad min, weight sum of squares, grad finite count].
    Summed over ranks (squares, counts) or reduced to the extremes, they give the whole parameters' record.
    A part this rank does not own (a replica counted on another rank) and an empty shard are neutral: zero
    sums, extremes at -inf/+inf. Without ``params`` (a gradient-norm step) the weight block is zero."""
    zero = torch.zeros((), dtype=_F32, device=grads[0].device if grads else None)
    neg, pos = zero - math.inf, zero + math.inf
    counted = [g.numel() > 0 and own for g, own in zip(grads, owners, strict=True)]
    grad_sq = [n.to(_F32).square() if c else zero for n, c in zip(torch._foreach_norm(grads, 2), counted, strict=True)]
    extremes = [torch.aminmax(g) if c else (pos, neg) for g, c in zip(grads, counted, strict=True)]
    finite = [_count_finite(g, _F32) if c else zero for g, c in zip(grads, counted, strict=True)]
    if params is None:
        weight_sq = [zero] * len(grads)
    else:
        norms = torch._foreach_norm(params, 2)
        weight_sq = [n.to(_F32).square() if c else zero for n, c in zip(norms, counted, strict=True)]
    parts = (*grad_sq, *(high for _, high in extremes), *(low for low, _ in extremes), *weight_sq, *finite)
    return torch.stack([t.to(_F32) for t in parts])


def finalize_activation(raw: Sequence[float], n: int, bounded: bool) -> dict[str, float | None]:
    """Host-side: turn a raw record over n elements into the wire statistics (all but dead_frac).

    A column that was not measured (NaN) gives None. An uncounted finite count is n when the sum is finite
    (any NaN or Inf element would have made it non-finite) and unknown (None) otherwise."""
    total, sumsq, high, low, finite, nonzero, saturated = raw
    if math.isnan(finite) and math.isfinite(total):
        finite = float(n)
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
        "zero_frac": None if math.isnan(finite) or math.isnan(nonzero) else (finite - nonzero) / n,
        "sat_frac": saturated / n if bounded and not math.isnan(saturated) else None,
        "nonfinite": None if math.isnan(finite) else float(round(n - finite)),
    }


def merge_raw(into: torch.Tensor, new: torch.Tensor) -> None:
    """Combine a second call of the same layer in one step into its record (counts add, extremes extend)."""
    high = torch.maximum(into[RAW_MAX], new[RAW_MAX])
    low = torch.minimum(into[RAW_MIN], new[RAW_MIN])
    into.add_(new)
    into[RAW_MAX] = high
    into[RAW_MIN] = low
