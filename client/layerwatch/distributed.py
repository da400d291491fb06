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
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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


class RankGradNorm:
    """This rank's own gradient norm per step under DDP, which the gradients after backward no longer show (DDP
    has averaged them across the ranks by then): a comm hook adds each bucket's local sum of squares, on the
    device, into the step's sum, then all-reduces the bucket as DDP's default hook does
    (``default_hooks.allreduce_hook``: divide by the group's size, all_reduce SUM).

    Installed at the first step, after the first backward, so that a comm hook the user registered before
    training is seen (DDP takes one hook only) and kept: then, for a model DDP does not wrap (FSDP, plain
    models), and for compiled DDP's Python reducer, nothing is measured, said once. A comm hook cannot be removed:
    after close() it only all-reduces."""

    def __init__(self, model: nn.Module) -> None:
        self.model: nn.Module | None = model  # dropped once the hook is in (or cannot be)
        self.closed = False
        self._sum: torch.Tensor | None = None  # the step's sum of squares so far, a fresh tensor each step

    def take(self) -> torch.Tensor | None:
        """The squared norm of this rank's gradients since the last call (0-d, on the device), None when no bucket
        was all-reduced (before the hook is in, or micro-batches under ``no_sync``)."""
        if self.model is not None:
            model, self.model = self.model, None
            try:
                self._install(model)
            except Exception:  # the rest of the monitoring goes on without them
                log.exception("layerwatch: no per-rank gradient norms: the comm hook could not be registered")
            return None
        value, self._sum = self._sum, None
        return value

    def _install(self, model: nn.Module) -> None:
        ddp = _ddp(model)
        why = None
        if ddp is None:
            why = "the model is not wrapped in DistributedDataParallel (FSDP and others all-reduce no buckets)"
        elif getattr(ddp, "_use_python_reducer", False):
            why = "compiled DDP's Python reducer takes no bucket hook"
        elif ddp._comm_hooks or ddp._get_ddp_logging_data().get("comm_hook"):
            why = "the model has a comm hook of its own (DDP takes one)"
        if why is not None:
            log.info("layerwatch: no per-rank gradient norms (grad_norm_rank_max): %s", why)
            return
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        assert ddp is not None
        self._allreduce = default_hooks.allreduce_hook
        ddp.register_comm_hook(ddp.process_group, self._hook)

    # Not annotated: DDP compares the annotations with dist.GradBucket and Future, which postponed ones are not.
    def _hook(self, state, bucket):
        if not self.closed:
            try:
                square = stats.sum_of_squares(bucket.buffer())  # before the all_reduce: this rank's own
                self._sum = square if self._sum is None else self._sum + square  # out of place: taken tensors stay
            except Exception:  # never keep the gradients from being all-reduced
                self.closed = True
                log.exception("layerwatch: per-rank gradient norms stopped after an error")
        return self._allreduce(state, bucket)


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DistributedDataParallel among the wrappers ``model`` is (it, or inside torch.compile's)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return None
        model = inner


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
