"""Where this process sits in a job: rank, world size, and the run key all ranks share."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from layerwatch import stats

log = logging.getLogger("layerwatch")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """From torch.distributed when it is up, else the launcher's variables (torchrun, Slurm)."""
    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    try:
        return int(rank), max(int(world), 1)
    except ValueError:
        log.warning("layerwatch: unreadable RANK/WORLD_SIZE (%r/%r); assuming a single process", rank, world)
        return 0, 1


def run_key(explicit: str | None) -> str:
    """A key that every rank of one job computes alike, so all of them land in one run.

    Order: LAYERWATCH_RUN_KEY (or the argument); torchrun's rendezvous id; Slurm's job (and step) id;
    otherwise rank 0 draws a random key and, when torch.distributed is up, broadcasts it (once, at start).
    """
    if explicit:
        return explicit
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return f"torchrun-{elastic}"
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        step = os.environ.get("SLURM_STEP_ID")
        return f"slurm-{slurm_job}" + (f".{step}" if step else "")
    key = uuid.uuid4().hex[:16]
    if _initialized() and dist.get_world_size() > 1:
        holder = [key]
        dist.broadcast_object_list(holder, src=0)
        key = holder[0]
    return key


class UnitReducer:
    """Combines the per-unit window extremes across ranks, so dead_frac is for the global batch.

    A unit is alive when any rank saw it active: the max of maxima and the min of minima decide. The set of
    units is fixed at the first window (every rank must pass the same sizes to a collective); it is checked
    once across ranks, and layers first seen later are reduced locally only.
    """

    def __init__(self) -> None:
        self.enabled = _initialized() and dist.get_world_size() > 1
        self.frozen_units: int | None = None

    def reduce(self, high: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """high/low: (total_units,) running max/min of every unit, all layers in discovery order."""
        if not self.enabled:
            return high, low
        if self.frozen_units is None:
            self.frozen_units = self._agree(high.numel())
            if not self.enabled:
                return high, low
        n = self.frozen_units
        both = torch.cat([high[:n], -low[:n]])
        try:
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        except Exception as exc:  # a rank left the job (stopped early): this rank's own units from now on
            self.enabled = False
            log.warning("layerwatch: dead units could not be combined across ranks (%s); per rank from now on", exc)
            return high, low
        return torch.cat([both[:n], high[n:]]), torch.cat([-both[n:], low[n:]])

    def _agree(self, units: int) -> int:
        # The one host synchronisation of a distributed run, at the end of its first window.
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mine = torch.tensor([units], device=device)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if int(low) != int(high):
            log.warning(
                "layerwatch: ranks watch different layers (%d vs %d units); dead_frac stays per rank",
                int(low),
                int(high),
            )
            self.enabled = False
        return units


def _dtensor_type() -> type | None:
    """DTensor's class when torch.distributed.tensor is loaded (sharded models load it), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _owns(param: torch.Tensor, dtensor: type | None) -> bool:
    """Whether this rank's local part counts once in a sum over ranks: each shard counts once, each replica
    (a Replicate mesh dim, a plain tensor every rank holds alike) only on its first coordinate."""
    if dtensor is None or not isinstance(param, dtensor):
        return not _initialized() or dist.get_rank() == 0
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(c == 0 for c, placement in zip(coordinate, param.placements, strict=True) if placement.is_replicate())


def _local(t: torch.Tensor, dtensor: type | None) -> torch.Tensor:
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


class ParamStats:
    """The per-step parameter record, also for sharded (FSDP2 ``fully_shard``, DTensor) parameters.

    Plain parameters get :func:`stats.param_raw` / :func:`stats.grad_norms`. Sharded ones are measured on
    their local shards as partial sums (squares, extremes, finite counts; see :func:`stats.param_partial`),
    all-gathered across ranks asynchronously as the step is recorded (one small collective per step, which
    the report waits for). Per step, not per report: every rank takes every step, but a report may come
    early on one rank only (a NaN it saw first), and a collective must be called alike on all of them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        dtensor = _dtensor_type()
        self.dtensor = dtensor
        self.sharded = dtensor is not None and any(isinstance(p, dtensor) for p in params)
        self._owner = {id(p): _owns(p, dtensor) for p in params} if self.sharded else {}
        self._world = dist.get_world_size() if self.sharded and _initialized() else 1
        self._pending: deque[tuple[Any, torch.Tensor]] = deque()  # (collective's work or None, gathered parts)

    def record(self, params: list[torch.Tensor], full: bool) -> torch.Tensor:
        """(P,) gradient norms, or the (PARAM_WIDTH * P,) full record; when sharded, this rank's partial
        record (see :func:`stats.param_partial`), which :meth:`combine` replaces by the whole one."""
        grads = [p.grad.detach() for p in params]
        if not self.sharded:
            return stats.param_raw([p.detach() for p in params], grads) if full else stats.grad_norms(grads)
        partial = stats.param_partial(
            [_local(p.detach(), self.dtensor) for p in params] if full else None,
            [_local(g, self.dtensor) for g in grads],
            [self._owner.get(id(p), False) for p in params],
        )
        if self._world == 1:
            self._pending.append((None, partial))
        else:
            gathered = partial.new_empty(self._world * partial.numel())
            self._pending.append((dist.all_gather_into_tensor(gathered, partial, async_op=True), gathered))
        return partial

    def combine(self, steps: list, tensors: list[torch.Tensor], keep: bool = False) -> None:
        """Replace each step's partial record in ``tensors`` (one per step with parameters, followed by its
        tensor scalars) by the whole parameters' record: per column the sum over ranks (squares, counts)
        or the extreme, square roots for the norms. ``keep``: the gathers stay for the report that follows
        (a preview of the interval so far; waiting on a gather every rank started is no new collective)."""
        if not self.sharded:
            return
        index, pending = 0, iter(list(self._pending))
        for meta in steps:
            if meta.params:
                work, gathered = next(pending) if keep else self._pending.popleft()
                if work is not None:
                    work.wait()
                k, width = len(meta.params), stats.PARAM_WIDTH
                ranks = gathered.view(self._world, width, k)
                total, high, low = ranks.sum(0), ranks.amax(0), ranks.amin(0)
                norms = total[stats.P_GRAD_NORM].sqrt()
                if meta.full_params:
                    parts = [norms, high[stats.P_GRAD_MAX], low[stats.P_GRAD_MIN], total[stats.P_WEIGHT_NORM].sqrt()]
                    tensors[index] = torch.cat([*parts, total[stats.P_GRAD_FINITE]])
                else:
                    tensors[index] = norms
                index += 1
            index += len(meta.tensor_scalars)
