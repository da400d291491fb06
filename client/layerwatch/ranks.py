"""One report for the whole job: a report interval's layer statistics combined across the ranks.

Each rank measures its share of the global batch. At a regular report, every rank's raw activation sums
(sums, squares, counts, extremes per layer and step) are combined (sums add, extremes extend, element counts
add), and rank 0 alone sends the global rows: ``act_std`` is then the global batch's, and the rows a job
stores do not grow with its world size. Per-rank detail stays where people ask it of wide jobs: per step the
spread of the loss (``loss_min``, ``loss_max``, ``loss_argmax_rank``), of the time between steps
(``step_time_max``, ``step_time_argmax_rank``) and of each rank's own gradient norm before DDP averages it
(``grad_norm_rank_max``, ``grad_norm_argmax_rank``; see :class:`layerwatch.distributed.RankGradNorm`), each
rank's mean of these per report (the batch's ``ranks`` key), and the rank where the first NaN/Inf appeared. What
travels does not grow with the world size but for those per-rank numbers (three per step and rank).

The dead-unit windows are OR-ed here too, in per-rank mode as well (``per_rank=True``): each rank packs the
units its share made active (one bit per unit), and a unit is dead only if no rank's bit is set.

The collectives run on the exporter thread, over a gloo group of its own, on host copies: the training thread
never waits for it, the device streams never hold it, and it cannot interleave with the training's own
collectives. The contract that keeps it from deadlocking (see docs/reference.md, "Distributed training"):
regular reports come at the same recorded steps on every rank (steps are collective under DDP/FSDP); the
tripwire sends a preview of one rank's rows, without a collective; ``close()`` sends its last partial interval
per rank, without a collective (its dead-unit windows are the rank's own). A window's activity is OR-ed with one
collective per window, in window order, which a per-rank report sent early (the tripwire, ``per_rank=True``) does
not reorder. A report whose peers never come (a rank that stopped early) fails when the peer's process leaves, or
after ``RANK_TIMEOUT``; then, as when the ranks' reports do not match (different layers, different steps), every
rank sends its own rows from then on.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from layerwatch import stats
from layerwatch.recorder import StepCalls
from layerwatch.report import Report

log = logging.getLogger("layerwatch")

RANK_TIMEOUT = 30.0  # seconds a report's gather waits for the other ranks before each rank sends its own rows


class RankReducer:
    """The report's collectives, on the exporter thread over a gloo group of its own: a layout check, then the
    sums (one SUM all_reduce), the extremes (one MAX all_reduce) and the per-rank loss, step times and gradient
    norms (one small all_gather) in flight together. Only the last grows with the world size: three floats per
    step and rank. Per dead-unit window a size check and one bitwise-OR all_reduce of its packed activity."""

    @classmethod
    def for_job(cls) -> RankReducer | None:
        """A reducer when torch.distributed is up with more than one rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls()

    def __init__(self, timeout: float = RANK_TIMEOUT) -> None:
        # new_group is itself collective: every rank calls watch().
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.enabled = True
        self._said_units = False

    def release(self) -> None:
        """Shut the group down once this rank's reports are all out (close()), on the caller's thread: a gloo
        group left to the interpreter's exit may be torn down while its threads still run (an abort)."""
        group, self.group, self.enabled = self.group, None, False
        try:
            if group is not None and dist.is_initialized() and group in dist.distributed_c10d._world.pg_map:
                dist.destroy_process_group(group)
        except Exception:
            log.debug("layerwatch: the ranks' group could not be shut down", exc_info=True)

    def _agree(self, layout: str, *sizes: int) -> bool:
        """Whether every rank's ``layout`` (hashed) and ``sizes`` are this rank's: one MAX all_reduce of them and their
        negations (equal on every rank exactly when the maximum is minus the minimum)."""
        mine = [zlib.crc32(layout.encode()), *sizes]
        header = torch.tensor(mine + [-n for n in mine], dtype=torch.int64)
        dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group)
        return bool((header[: len(mine)] == -header[len(mine) :]).all())

    def combine(self, layout: str, mine: Part) -> Part | None:
        """Every rank's ``mine`` combined (``ranks`` gathered, (world, n)) when every rank's ``layout`` is this one's;
        else None, and every rank (all see the same layouts) sends its own rows from then on. None too when a peer
        does not come (it stopped early)."""
        if not self.enabled:
            return None
        try:
            if not self._agree(layout, mine.sums.numel(), mine.highs.numel(), mine.ranks.numel()):
                self.enabled = False
                log.warning("layerwatch: ranks' reports differ (layers or steps); each rank sends its own rows now")
                return None
            sums, highs = mine.sums.clone(), mine.highs.clone()
            ranks = mine.ranks.new_empty(self.world * mine.ranks.numel())
            works = [
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group, async_op=True),
                dist.all_reduce(highs, op=dist.ReduceOp.MAX, group=self.group, async_op=True),
                dist.all_gather_single(ranks, mine.ranks, group=self.group, async_op=True),
            ]
            for work in works:
                work.wait()
            return Part(sums, highs, ranks.view(self.world, -1))
        except Exception as exc:  # a peer left (stopped early) or timed out: never raise into the exporter
            self.enabled = False
            log.warning("layerwatch: the ranks' report could not be combined (%s); each rank sends its own rows", exc)
            return None

    def any(self, bits: torch.Tensor, layout: str) -> torch.Tensor | None:
        """The bitwise OR of every rank's ``bits`` (int32); None when their ``layout`` or sizes differ (that time: the
        ranks watch other layers) or a peer does not come (from then on)."""
        if not self.enabled:
            return None
        try:
            if not self._agree(layout, bits.numel()):
                if not self._said_units:
                    self._said_units = True
                    log.warning("layerwatch: ranks watch different units; dead_frac is each rank's own while they do")
                return None
            bits = bits.clone()
            dist.all_reduce(bits, op=dist.ReduceOp.BOR, group=self.group)
            return bits
        except Exception as exc:  # a peer left (stopped early) or timed out: never raise into the exporter
            self.enabled = False
            log.warning("layerwatch: dead units could not be combined across ranks (%s); each rank's own now", exc)
            return None


def reduce_windows(reducer: RankReducer, report: Report, values: list[float], words: torch.Tensor) -> None:
    """Each dead-unit window of ``report`` for the ranks' global batch: its units' activity (``words``, this rank's,
    packed) and its layers' calls OR-ed across the ranks, then ``dead_frac`` in ``values`` and the calls in
    ``report.dead_windows`` replaced; a window that could not be OR-ed keeps this rank's own."""
    n_layers = len(report.layers)
    cursor = n_layers * len(report.steps) * stats.RAW_WIDTH if n_layers else 0
    units = [layer["units"] for layer in report.layers]
    offset = 0
    for i, ((position, called), size) in enumerate(zip(report.dead_windows, report.activity, strict=True)):
        mine = torch.cat([words[offset : offset + size], stats.pack_bits(torch.tensor(called, dtype=torch.bool))])
        offset += size
        width = len(called)
        both = reducer.any(mine.to(torch.int32), repr(units[:width]))
        if both is not None:
            total = sum(units[:width])
            active = stats.unpack_bits(both[:size], total).to(torch.float64)
            bounds = torch.tensor([0, *units[:width]]).cumsum(0)
            sums = torch.cat([active.new_zeros(1), active.cumsum(0)])[bounds]
            alive = (sums[1:] - sums[:-1]).tolist()
            values[cursor : cursor + width] = [1.0 - a / u for a, u in zip(alive, units[:width], strict=True)]
            report.dead_windows[i] = (position, stats.unpack_bits(both[size:], width).tolist())
        cursor += n_layers


@dataclass
class Part:
    """A rank's numbers of one report, float64 (counts stay exact), each to be combined its own way."""

    sums: torch.Tensor  # summed: the additive raw columns (layers x steps x 5), then elements (layers x steps)
    highs: torch.Tensor  # max-reduced: max, -min (layers x steps each), then world - rank where a sum was non-finite
    ranks: torch.Tensor  # gathered: per step the loss, then the seconds since the step before, then the rank's own
    # gradient norm (NaN where not measured)


_ADDITIVE = (stats.RAW_SUM, stats.RAW_SUMSQ, stats.RAW_FINITE, stats.RAW_NONZERO, stats.RAW_SAT)


def layout(report: Report) -> str:
    """What must be alike on every rank for their reports to combine: layers and steps."""
    return repr(([layer["name"] for layer in report.layers], [meta.step for meta in report.steps]))


def rank_part(
    report: Report, values: list[float], steps: list[dict[str, Any]], times: list[float], rank: int, world: int
) -> Part:
    """This rank's part of a report: ``values`` its flat numbers, ``steps`` translated, ``times`` between steps."""
    n_layers, n_steps = len(report.layers), len(report.steps)
    raw = torch.tensor(values[: n_layers * n_steps * stats.RAW_WIDTH], dtype=torch.float64)
    raw = raw.view(n_layers, n_steps, stats.RAW_WIDTH)
    elements = torch.zeros(n_layers, n_steps, dtype=torch.float64)
    for position, meta in enumerate(report.steps):
        for index, count in meta.calls.elements.items():
            elements[index, position] = count
    ran = elements > 0  # a slot of a layer that did not run holds an older step's sums
    sums = torch.where(ran.unsqueeze(-1), raw[..., list(_ADDITIVE)], 0.0)
    high = torch.where(ran, raw[..., stats.RAW_MAX], -math.inf)
    low = torch.where(ran, -raw[..., stats.RAW_MIN], -math.inf)
    bad = torch.where(ran & ~torch.isfinite(raw[..., stats.RAW_SUM]), float(world - rank), 0.0)
    loss = [math.nan if s["loss"] is None else s["loss"] for s in steps]
    grads = [math.nan if meta.rank_grad_norm is None else meta.rank_grad_norm for meta in report.steps]
    return Part(
        torch.cat([sums.reshape(-1), elements.reshape(-1)]),
        torch.cat([high.reshape(-1), low.reshape(-1), bad.reshape(-1)]),
        torch.tensor(loss + times + grads, dtype=torch.float64),
    )


class Combined:
    """The ranks' numbers of one report combined: global raw sums and element counts, per-step loss, step-time and
    own-gradient-norm spread, and per (layer, step) the first rank whose activations were non-finite."""

    def __init__(self, report: Report, part: Part, world: int) -> None:
        n_layers, n_steps = len(report.layers), len(report.steps)
        cells = n_layers * n_steps
        raw = torch.zeros(n_layers, n_steps, stats.RAW_WIDTH, dtype=torch.float64)
        raw[..., list(_ADDITIVE)] = part.sums[: cells * len(_ADDITIVE)].view(n_layers, n_steps, len(_ADDITIVE))
        highs = part.highs.view(3, n_layers, n_steps)
        raw[..., stats.RAW_MAX], raw[..., stats.RAW_MIN] = highs[0], -highs[1]
        self.raw = raw
        self.elements = part.sums[cells * len(_ADDITIVE) :].view(n_layers, n_steps)
        self.first_bad_rank = torch.where(highs[2] > 0, world - highs[2], -1.0).long()  # (layers, steps)
        per_step = part.ranks.view(world, 3, n_steps)
        self.loss, self.step_time, self.grad_norm = per_step.unbind(1)  # (world, steps) each

    def apply(self, report: Report, values: list[float]) -> None:
        """Put the global sums into ``values`` and the global element counts and layer order into the steps."""
        n_layers, n_steps = self.elements.shape
        values[: n_layers * n_steps * stats.RAW_WIDTH] = self.raw.reshape(-1).tolist()
        counts = self.elements.tolist()
        for position, meta in enumerate(report.steps):
            ran = [i for i in range(n_layers) if counts[i][position] > 0]
            order = meta.calls.order + [i for i in ran if i not in meta.calls.elements]
            meta.calls = StepCalls(order=order, elements={i: int(counts[i][position]) for i in order})

    def spread(self, steps: list[dict[str, Any]]) -> None:
        """Per step: the loss as the ranks' mean, its spread and the rank of its largest; the slowest step time; the
        largest of the ranks' own gradient norms and its rank (a non-finite one counts as the largest)."""
        for position, step in enumerate(steps):
            loss = self.loss[:, position]
            if not bool(loss.isnan().all()):
                step["loss"] = loss.mean().item()
                step["scalars"].update(
                    loss_min=loss.min().item(), loss_max=loss.max().item(), loss_argmax_rank=float(loss.argmax())
                )
            took = self.step_time[:, position]
            if bool(took.isfinite().all()):
                step["scalars"].update(step_time_max=took.max().item(), step_time_argmax_rank=float(took.argmax()))
            norms = self.grad_norm[:, position]
            if not bool(norms.isnan().all()):
                worst = int(norms.nan_to_num(math.inf).argmax())  # NaN (a NaN gradient) above every number
                step["scalars"].update(grad_norm_rank_max=norms[worst].item(), grad_norm_argmax_rank=float(worst))

    def ranks(self) -> dict[str, list[float | None]]:
        """The batch's ``ranks`` key: each rank's mean loss, step time and own gradient norm over the report (NaN-free
        means)."""
        return {
            "loss_mean": _means(self.loss),
            "step_time_mean": _means(self.step_time),
            "grad_norm_mean": _means(self.grad_norm),
        }

    def origin_rank(self, origin: dict[str, Any], layer_names: list[str], first_step: int) -> int:
        """The rank where ``origin`` (found in the global rows) first appeared."""
        position = origin["step"] - first_step
        if origin["pass"] == "forward" and origin["layer"] in layer_names:
            rank = int(self.first_bad_rank[layer_names.index(origin["layer"]), position])
            return max(rank, 0)
        if origin["pass"] == "loss":
            bad = ~torch.isfinite(self.loss[:, position])
            return int(bad.float().argmax()) if bool(bad.any()) else 0
        norms = self.grad_norm[:, position]  # gradients: the first rank whose own norm was not finite, if measured
        bad = ~torch.isfinite(norms) & ~norms.isnan().all()
        return int(bad.float().argmax()) if bool(bad.any()) else origin["rank"]


def _means(per_rank: torch.Tensor) -> list[float | None]:
    finite = per_rank.isfinite()
    counts = finite.sum(1)
    totals = torch.where(finite, per_rank, 0.0).sum(1)
    return [t / c if c else None for t, c in zip(totals.tolist(), counts.tolist(), strict=True)]
