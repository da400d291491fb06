"""Per-layer distributions: fixed-bin histograms of activations and gradients, counted on the device.

Bins (the same for every layer, run and scale): one bin per power of two of the magnitude, signed, from
2**-27 (~7.5e-9) to 2**14 (16384), plus per sign an underflow bin (below 2**-27) and an overflow bin (2**14
and above, +/-Inf included), and one bin for zero. ``EDGES`` lists the boundaries in ascending order; bin
``i`` lies between ``EDGES[i-1]`` and ``EDGES[i]`` and is closed on the side nearer zero: [2**k, 2**(k+1))
on the positive side, (-2**(k+1), -2**k] on the negative side. The zero bin is (-2**-126, 2**-126): exact
zeros and float32's subnormals (which GPUs commonly flush to zero anyway). NaNs are in no bin: they are
counted apart. Counts are exact integers.

Why powers of two: a float's bin is then its sign and exponent bits. Counting is a shift of the bit pattern
and one ``bincount`` over 1024 codes (sign, exponent, the top mantissa bit, which tells a quiet NaN from an
Inf), folded into the bins once per report; no comparisons, no logarithms. bfloat16 shares float32's
exponent, so it is counted as it is; other float types are converted to float32 first.

Which steps: every ``histogram_every`` steps (default: the first multiple of ``every`` from 100 on), the last
step of a report interval, counted alike on every rank, so that under torch.distributed one all_reduce sums the
counts across ranks at that step (the global histogram). Not every report by default: on CPU one histogram per
10 steps measured 1.5-3% of a step (``bench/client_overhead.py``), above the 1% budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

LOW_EXP, HIGH_EXP = -27, 14  # magnitude bins [2**k, 2**(k+1)) for k in [LOW_EXP, HIGH_EXP)
_MAGNITUDE = [2.0**k for k in range(LOW_EXP, HIGH_EXP + 1)]
EDGES: tuple[float, ...] = (*(-m for m in reversed(_MAGNITUDE)), -(2.0**-126), 2.0**-126, *_MAGNITUDE)
BINS = len(EDGES) + 1  # 87
ZERO_BIN = len(_MAGNITUDE) + 1  # 43
NAN = BINS  # the column after the bins, in folded counts: NaNs
CODES = 1024  # sign (1 bit), exponent (8 bits), top mantissa bit


def _bin_of_code(code: int) -> int:
    negative, exponent, quiet = code >> 9, (code >> 1) & 0xFF, code & 1
    if exponent == 0xFF:
        if quiet:
            return NAN
        k = HIGH_EXP  # +/-Inf: overflow
    elif exponent == 0:
        return ZERO_BIN
    else:
        k = exponent - 127
    offset = min(max(k - LOW_EXP, -1), HIGH_EXP - LOW_EXP) + 1  # 0 underflow, 1.. magnitudes, last overflow
    return ZERO_BIN - 1 - offset if negative else ZERO_BIN + 1 + offset


FOLD: tuple[int, ...] = tuple(_bin_of_code(c) for c in range(CODES))


def codes(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each element's 10-bit code (sign, exponent, top mantissa bit) as a flat integer tensor."""
    if t.dtype == torch.bfloat16:
        bits, shift = t.view(torch.int16), 6
    else:
        if t.dtype != torch.float32:
            t = t.float()
        bits, shift = t.view(torch.int32), 22
    if out is not None and out.shape == bits.shape:
        code = torch.bitwise_right_shift(bits, shift, out=out)
    else:
        code = torch.bitwise_right_shift(bits, shift)
    return code.bitwise_and_(CODES - 1).reshape(-1)


_EXACT_CHUNK = 1 << 24  # float32 counts are exact up to here
CPU_CHUNK = 1 << 18  # elements per bincount on CPU: their codes (int64) stay in cache, the buffer small


def count_codes(t: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """(CODES,) int64 counts of the codes of ``t``'s elements. ``scratch``: a CPU int64 buffer of CPU_CHUNK
    elements for the codes (fresh large temporaries page-fault in on every call: see stats.Scratch).

    On CUDA ``bincount`` reads its input's maximum back to the host (a sync per call), so there the codes are
    counted with ``histc`` over a fixed range (no sync), in float32 chunks small enough to count exactly."""
    flat = t.reshape(-1)
    if flat.is_cuda:
        total = torch.zeros(CODES, dtype=torch.int64, device=flat.device)
        for chunk in codes(flat).split(_EXACT_CHUNK):
            total += torch.histc(chunk.float(), bins=CODES, min=0, max=CODES).long()
        return total
    total = torch.zeros(CODES, dtype=torch.int64)
    for chunk in flat.split(CPU_CHUNK):
        out = scratch.narrow(0, 0, chunk.numel()) if scratch is not None else None
        total += torch.bincount(codes(chunk, out), minlength=CODES)
    return total


def fold(code_counts: torch.Tensor) -> torch.Tensor:
    """(..., CODES) code counts -> (..., BINS + 1) bin counts, the last column NaNs."""
    index = torch.tensor(FOLD, device=code_counts.device)
    shape = (*code_counts.shape[:-1], BINS + 1)
    return torch.zeros(shape, dtype=code_counts.dtype, device=code_counts.device).index_add_(-1, index, code_counts)


def histogram(t: torch.Tensor) -> torch.Tensor:
    """(BINS + 1,) int64: the counts of ``t`` in the bins, then its NaN count. The reference the recorder's
    incremental counting equals."""
    return fold(count_codes(t.detach()))


def module_of(param_name: str) -> str:
    """The module that owns a parameter, by name ("fc1.weight" -> "fc1"); a root parameter names itself."""
    owner, _, _ = param_name.rpartition(".")
    return owner or param_name


@dataclass
class Snapshot:
    """One histogram step's counts, copied to the host: rows in ``names`` order, kinds alike."""

    step: int
    names: list[tuple[str, str]]  # (kind, layer name) per row
    counts: torch.Tensor  # (rows, CODES) int64, host (pinned where CUDA is present)
    ready: Any = None  # CUDA event after the copy, or None
    work: Any = None  # the all_reduce still in flight, or None

    def to_wire(self) -> list[dict[str, Any]]:
        """The batch's ``histograms.layers`` entries; rows that counted nothing are left out."""
        if self.work is not None:
            self.work.wait()
        if self.ready is not None:
            self.ready.synchronize()
        folded = fold(self.counts).tolist()
        out = []
        for (kind, name), row in zip(self.names, folded, strict=True):
            if any(row):
                out.append({"layer": name, "kind": kind, "step": self.step, "counts": row[:BINS], "nan": row[BINS]})
        return out


@dataclass
class Histograms:
    """Device buffers of code counts per watched layer (activations) and per parameter-owning module
    (gradients), filled at histogram steps only; ``due`` says whether the coming step is one."""

    modules: list[str]  # gradient rows: the modules that own the watched parameters, in first-seen order
    param_rows: list[int]  # per watched parameter, its module's row
    due: bool = False
    _acts: torch.Tensor | None = field(default=None, repr=False)  # (layer capacity, CODES) int64
    _scratch: torch.Tensor | None = field(default=None, repr=False)  # (CPU_CHUNK,) int64

    @classmethod
    def for_params(cls, names: list[str]) -> Histograms:
        modules: dict[str, int] = {}
        rows = [modules.setdefault(module_of(name), len(modules)) for name in names]
        return cls(list(modules), rows)

    def start(self) -> None:
        """The coming step is a histogram step: clear the activation counts."""
        self.due = True
        if self._acts is not None:
            self._acts.zero_()

    def add_activation(self, index: int, a: torch.Tensor) -> None:
        """Count one call's output into layer ``index``'s row (calls within the step add up)."""
        acts = self._acts
        if acts is None or index >= acts.shape[0] or acts.device != a.device:
            rows = max(16, 2 * (index + 1), acts.shape[0] if acts is not None else 0)
            bigger = torch.zeros(rows, CODES, dtype=torch.int64, device=a.device)
            if acts is not None:
                bigger[: acts.shape[0]] = acts.to(a.device)
            self._acts = acts = bigger
        acts[index] += count_codes(a, self._out(a))

    def _out(self, a: torch.Tensor) -> torch.Tensor | None:
        """The reused CPU buffer for the codes of one chunk (bincount counts int64 codes fastest)."""
        if not a.is_cpu or a.dtype not in (torch.float32, torch.bfloat16):
            return None
        if self._scratch is None:
            self._scratch = torch.empty(CPU_CHUNK, dtype=torch.int64)
        return self._scratch

    def take(
        self,
        step: int,
        layer_names: list[str],
        grads: list[tuple[int, torch.Tensor]],
        reducer: RankSum | None = None,
    ) -> Snapshot:
        """End of a histogram step: count the gradients (``(param index, local gradient)``, those this rank
        owns) into rows above the activations', start the sum over ranks and the copy to the host."""
        self.due = False
        n_layers, n_modules = len(layer_names), len(self.modules)
        device = self._acts.device if self._acts is not None else (grads[0][1].device if grads else torch.device("cpu"))
        counts = torch.zeros(n_modules + n_layers, CODES, dtype=torch.int64, device=device)
        for index, grad in grads:
            grad = grad.detach().to(device)
            counts[self.param_rows[index]] += count_codes(grad, self._out(grad))
        if self._acts is not None and n_layers:
            counts[n_modules:] = self._acts[:n_layers]
        work = reducer.start(counts, n_modules, n_layers) if reducer is not None else None
        names = [("gradient", m) for m in self.modules] + [("activation", n) for n in layer_names]
        host, ready = counts, None
        if counts.device.type == "cuda":
            if work is not None:
                work.wait()  # on CUDA the wait only orders the copy after the reduction on the stream
                work = None
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        elif counts.device.type != "cpu":
            host = counts.cpu()
        return Snapshot(step, names, host, ready, work)


def wire_section(snapshots: list[Snapshot]) -> dict[str, Any] | None:
    """The batch's optional ``histograms`` key, or None when no snapshot counted anything."""
    layers = [entry for snapshot in snapshots for entry in snapshot.to_wire()]
    return {"edges": list(EDGES), "layers": layers} if layers else None


class RankSum:
    """Sums the counts over the ranks of torch.distributed: one asynchronous all_reduce per histogram step (every
    rank takes the same steps). A collective needs the same size on every rank: the gradient rows are the same
    (one per parameter-owning module); the activation rows are agreed once, at the first histogram step (the one
    host synchronisation of a distributed run), and layers first seen later, or
    all of them when ranks disagree then, are counted on rank 0 alone."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.frozen_layers: int | None = None

    def start(self, counts: torch.Tensor, n_modules: int, n_layers: int) -> Any:
        """The work handle of the sum of ``counts``' leading rows, in place; None when alone."""
        if not self.enabled:
            return None
        dist = self.dist
        if self.frozen_layers is None:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            low, high = torch.tensor([n_layers], device=device), torch.tensor([n_layers], device=device)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            self.frozen_layers = n_layers if int(low) == int(high) else 0
        rows = n_modules + min(self.frozen_layers, n_layers)
        return dist.all_reduce(counts.narrow(0, 0, rows), op=dist.ReduceOp.SUM, async_op=True)


def owned_gradients(params: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """(index, local gradient) of the parameters whose gradients this rank counts, so that the sum over ranks
    counts each element once: every shard of a sharded (FSDP2, DTensor) parameter, a replicated one on one
    rank only (as :class:`layerwatch.distributed.ParamStats` counts them)."""
    from layerwatch.distributed import _dtensor_type, _local, _owns

    dtensor = _dtensor_type()
    return [(i, _local(p.grad, dtensor)) for i, p in params if p.grad is not None and _owns(p, dtensor)]
