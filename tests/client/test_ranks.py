"""Reports combined across ranks (per_rank=False, the default) on real gloo processes: the global rows equal one
process's statistics of the same global batch, the rows a job sends do not grow with its world size, a NaN's origin
names its rank, and a rank that stops early leaves the others to finish."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import layerwatch
from tests.client.conftest import read_spool
from tests.client.test_ddp import _free_port

STEPS, EVERY, BATCH = 4, 2, 8
LAYER_STATS = ("act_mean", "act_std", "act_max_abs", "zero_frac", "dead_frac", "sat_frac")
PARAM_STATS = ("grad_norm", "grad_max_abs", "weight_norm")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh())
    with torch.no_grad():
        model[2].bias.fill_(-2.0)  # outputs mostly negative: their largest magnitude is a minimum
    return model


def _global_batches() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(BATCH, 6) - 0.5 for _ in range(STEPS)]


def _train(model: nn.Module, batches: list[torch.Tensor], spool_dir: str, **settings: Any) -> None:
    mon = layerwatch.watch(model, mode="offline", spool_dir=spool_dir, every=EVERY, param_every=1, **settings)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x in batches:
        loss = model(x).square().mean()
        loss.backward()
        mon.step(loss=loss, lr=0.1)
        opt.step()
        opt.zero_grad()
    mon.close()


def _worker(rank: int, world: int, port: int, spool_dir: str, nan_rank: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        share = BATCH // world
        batches = [x[rank * share : (rank + 1) * share].clone() for x in _global_batches()]
        if rank == nan_rank:
            batches[STEPS - 1][0, 0] = math.nan  # this rank's last step goes NaN
        _train(DistributedDataParallel(_model()), batches, spool_dir)  # per_rank=False: the default
    finally:
        dist.destroy_process_group()


def _spawn(world: int, spool_dir: Path, nan_rank: int = -1) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(world, _free_port(), str(spool_dir), nan_rank), nprocs=world, join=True)
    return read_spool(spool_dir)


def _rows(batches: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(kind, name, step) -> {stat: value} over every batch."""
    out = {}
    for batch in batches:
        layers = {e["index"]: e["name"] for e in batch["layers"]}
        params = {e["index"]: e["name"] for e in batch["params"]}
        for step in batch["steps"]:
            for row in step["layers"]:
                out["layer", layers[row[0]], step["step"]] = dict(zip(batch["layer_stats"], row[1:], strict=True))
            for row in step["params"]:
                out["param", params[row[0]], step["step"]] = dict(zip(batch["param_stats"], row[1:], strict=True))
            out["step", "", step["step"]] = {"loss": step["loss"], **step["scalars"]}
    return out


def _count_rows(batches: list[dict[str, Any]]) -> int:
    return sum(len(s["layers"]) + len(s["params"]) for b in batches for s in b["steps"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_combined_rows_equal_one_process_on_the_global_batch(tmp_path: Path, world: int):
    _train(_model(), _global_batches(), str(tmp_path / "one"))
    alone = read_spool(tmp_path / "one")
    batches = _spawn(world, tmp_path / "job")

    assert {b["rank"] for b in batches if b["steps"]} == {0}  # rank 0 sends the job's rows
    assert _count_rows(batches) == _count_rows(alone) > 0  # the same rows as one process
    want, got = _rows(alone), _rows(batches)
    assert want.keys() == got.keys()
    for key, row in want.items():
        kind = key[0]
        names = LAYER_STATS if kind == "layer" else PARAM_STATS if kind == "param" else ("loss",)
        for name in names:
            if row[name] is None:
                assert got[key][name] is None, (key, name)
            else:
                # abs: act_std comes from float32 sums of squares (cancellation where |mean| >> std)
                assert got[key][name] == pytest.approx(row[name], rel=1e-5, abs=1e-5), (key, name)
    for step in range(STEPS):
        spread = got["step", "", step]
        assert spread["loss_min"] <= spread["loss"] <= spread["loss_max"]
        assert 0 <= spread["loss_argmax_rank"] < world
    assert any("step_time_max" in got["step", "", s] for s in range(STEPS))
    per_rank = [b["ranks"] for b in batches if "ranks" in b]
    assert per_rank and all(len(r["loss_mean"]) == world for r in per_rank)


def _default_worker(rank: int, world: int, port: int, spool_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(DistributedDataParallel(_model()), _global_batches(), spool_dir)  # per_rank from the environment
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("per_rank", [None, "1"])
def test_combined_by_default_and_per_rank_keeps_each_ranks_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_rank: str | None
):
    if per_rank is not None:
        monkeypatch.setenv("LAYERWATCH_PER_RANK", per_rank)  # spawned ranks inherit the environment
    mp.spawn(_default_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    senders = {b["rank"] for b in read_spool(tmp_path) if b["steps"]}
    assert senders == ({0, 1} if per_rank else {0})


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_nonfinite_origin_names_the_rank_it_appeared_on(tmp_path: Path):
    from layerwatch_server.core.batch import Batch

    batches = _spawn(2, tmp_path, nan_rank=1)
    origins = [b["nonfinite_origin"] for b in batches if b.get("nonfinite_origin")]
    assert origins == [{"step": STEPS - 1, "pass": "forward", "layer": "0", "rank": 1}]
    for batch in batches:  # the collector takes them as they are (the ranks key and the spread scalars included)
        Batch.model_validate(batch)


def _stopping_worker(rank: int, world: int, port: int, spool_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        steps = EVERY if rank == 1 else 3 * EVERY  # rank 1 leaves after one report, rank 0 goes on
        _train(_model(), _global_batches()[:1] * steps, spool_dir, per_rank=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_rank_that_stops_early_does_not_hang_the_others(tmp_path: Path):
    context = mp.spawn(_stopping_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "a rank hung"
    batches = read_spool(tmp_path)
    steps = {(b["rank"], s["step"]) for b in batches for s in b["steps"]}
    # Steps 0-1 combined (rank 0 sends them); then rank 0 goes on alone and sends its own rows.
    assert steps == {(0, s) for s in range(3 * EVERY)}
    assert {b["rank"]: b["end"] for b in batches if b["end"]} == {0: {"status": "finished"}, 1: {"status": "finished"}}


def test_a_layer_that_ran_on_one_rank_only_counts_that_ranks_share():
    """A layer's slot where it did not run holds an older step's sums: they must not enter the job's figures."""
    from layerwatch import stats
    from layerwatch.ranks import Combined, Part, rank_part
    from layerwatch.recorder import StepCalls
    from layerwatch.report import Report, StepMeta, translate

    def report(calls: dict[int, int]) -> Report:
        layers = [{"name": name} for name in ("a", "b")]
        meta = StepMeta(step=7, time=1.0, calls=StepCalls(order=list(calls), elements=dict(calls)))
        return Report(steps=[meta], layers=layers, bounded=[False, False], dead_windows=[], param_numel=[], flat=None)

    def record(values: list[float]) -> list[float]:
        t = torch.tensor(values)
        return [t.sum(), t.square().sum(), t.max(), t.min(), len(values), (t != 0).sum(), math.nan]

    stale = [1e9] * stats.RAW_WIDTH
    mine = {
        0: (report({0: 2}), record([1.0, 2.0]) + stale),  # layer b did not run on rank 0
        1: (report({0: 1, 1: 3}), record([4.0]) + record([-1.0, 0.0, 5.0])),
    }
    parts = [
        rank_part(r, [float(v) for v in values], [{"loss": float(rank)}], [0.5], rank, 2)
        for rank, (r, values) in mine.items()
    ]
    whole = Part(
        parts[0].sums + parts[1].sums,
        torch.maximum(parts[0].highs, parts[1].highs),
        torch.stack([parts[0].ranks, parts[1].ranks]),
    )
    rank0, values = mine[0]
    values = [float(v) for v in values]
    combined = Combined(rank0, whole, 2)
    combined.apply(rank0, values)
    assert rank0.steps[0].calls.order == [0, 1] and rank0.steps[0].calls.elements == {0: 3, 1: 3}
    steps = translate(rank0, values, {})
    combined.spread(steps)
    a, b = (dict(zip(layerwatch.wire.LAYER_STATS, row[1:], strict=True)) for row in steps[0]["layers"])
    assert a["act_mean"] == pytest.approx(7 / 3) and a["act_max_abs"] == 4.0
    assert b["act_mean"] == pytest.approx(4 / 3) and b["act_max_abs"] == 5.0 and b["zero_frac"] == pytest.approx(1 / 3)
    assert steps[0]["loss"] == 0.5 and steps[0]["scalars"]["loss_argmax_rank"] == 1.0
