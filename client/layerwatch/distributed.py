"""Where this process sits in a job: rank, world size, and the run key all ranks share."""

from __future__ import annotations

import logging
import os
import uuid

import torch
import torch.distributed as dist

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
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
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
