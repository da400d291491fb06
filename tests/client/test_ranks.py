"""Reports combined across ranks (per_rank=False, the default) on real gloo processes: the global rows equal one
process's statistics of the same global batch, dead units included, the rows a job sends do not grow with its world
size, the rank with the largest gradient of its own and a NaN's origin are named, the training thread reads no
tensor value and starts no collective of layerwatch's, and a rank that stops early leaves the others to finish."""

from __future__ import annotations

import json
import math
import os
import threading
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
from layerwatch.syncs import HostReads
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


def _stopping_worker(rank: int, world: int, port: int, spool_dir: str, per_rank: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        steps = EVERY if rank == 1 else 3 * EVERY  # rank 1 leaves after one report, rank 0 goes on
        _train(_model(), _global_batches()[:1] * steps, spool_dir, per_rank=per_rank, window=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("per_rank", [False, True])
def test_a_rank_that_stops_early_does_not_hang_the_others(tmp_path: Path, per_rank: bool):
    """Combined reports, and (both modes) a dead-unit window OR-ed across the ranks at every step."""
    context = mp.spawn(_stopping_worker, args=(2, _free_port(), str(tmp_path), per_rank), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "a rank hung"
    batches = read_spool(tmp_path)
    steps = {(b["rank"], s["step"]) for b in batches for s in b["steps"]}
    if per_rank:
        assert steps == {(0, s) for s in range(3 * EVERY)} | {(1, s) for s in range(EVERY)}
    else:  # steps 0-1 combined (rank 0 sends them); then rank 0 goes on alone and sends its own rows
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


SCALE = 3.0  # rank 1's share of the batch is scaled: its own gradients are the larger


def _scaled_batches() -> list[torch.Tensor]:
    batches = _global_batches()
    for x in batches:
        x[BATCH // 2 :] *= SCALE
    return batches


def _grad_worker(rank: int, world: int, port: int, spool_dir: str, out: str) -> None:
    from layerwatch.distributed import RankGradNorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reads, hooked = HostReads(), []
    hook = RankGradNorm._hook

    def counted(self, state, bucket):  # no annotations: DDP checks them
        hooked.append(bucket.index())
        with reads:  # DDP calls the hook where the training thread's torch function modes do not reach
            return hook(self, state, bucket)

    RankGradNorm._hook = counted
    try:
        share = BATCH // world
        model = DistributedDataParallel(_model())
        mon = layerwatch.watch(model, mode="offline", spool_dir=spool_dir, every=EVERY, param_every=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in _scaled_batches():
            loss = model(x[rank * share : (rank + 1) * share]).square().mean()
            with reads:
                loss.backward()
                mon.step(loss=loss, lr=0.1)
            opt.step()
            opt.zero_grad()
        mon.close()
        Path(out, f"{rank}.json").write_text(json.dumps({"reads": reads.calls, "hooked": len(hooked)}))
    finally:
        RankGradNorm._hook = hook
        dist.destroy_process_group()


def _own_grad_norms(rank: int, world: int) -> list[float]:
    """Per step, the norm of ``rank``'s own gradient, in one process training on the global batch (DDP's averaged
    gradient of equal shares is the global batch's)."""
    model, norms = _model(), []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    share = BATCH // world
    for x in _scaled_batches():
        model(x[rank * share : (rank + 1) * share]).square().mean().backward()
        norms.append(math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters())))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return norms


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_the_rank_with_the_largest_gradient_of_its_own_is_named(tmp_path: Path):
    from layerwatch_server.core.batch import Batch

    mp.spawn(_grad_worker, args=(2, _free_port(), str(tmp_path / "job"), str(tmp_path)), nprocs=2, join=True)
    batches = read_spool(tmp_path / "job")
    got = _rows(batches)
    mine, theirs = _own_grad_norms(1, 2), _own_grad_norms(0, 2)
    assert all(a > b for a, b in zip(mine, theirs, strict=True))  # the premise: rank 1's own gradients are larger
    # Measured from step 1: the comm hook goes in at the first step, after the first backward.
    assert "grad_norm_rank_max" not in got["step", "", 0]
    for step in range(1, STEPS):
        spread = got["step", "", step]
        assert spread["grad_norm_argmax_rank"] == 1.0
        assert spread["grad_norm_rank_max"] == pytest.approx(mine[step], rel=1e-5)
    means = [b["ranks"]["grad_norm_mean"] for b in batches if "ranks" in b]
    assert means[0] == [pytest.approx(theirs[1]), pytest.approx(mine[1])]  # step 0 not measured: step 1's
    # The gradients DDP averaged are the job's, as without the hook: the global batch's, in one process.
    _train(_model(), _scaled_batches(), str(tmp_path / "one"))
    alone = _rows(read_spool(tmp_path / "one"))
    for key, row in alone.items():
        if key[0] == "param":
            assert got[key]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5), key
    for rank in (0, 1):
        seen = json.loads(Path(tmp_path, f"{rank}.json").read_text())
        assert seen == {"reads": [], "hooked": STEPS - 1}  # 0 host syncs per step, the comm hook's included
    for batch in batches:
        Batch.model_validate(batch)


def _unit_model() -> nn.Module:
    linear = nn.Linear(4, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(4))
        linear.bias.zero_()
    return nn.Sequential(linear, nn.ReLU())


def _unit_batch(world: int) -> torch.Tensor:
    """Rank r's three rows keep unit r alive, no other: on 2 ranks units 2 and 3 die, on 4 none does."""
    rows = []
    for rank in range(world):
        x = -torch.ones(3, 4)
        x[:, rank] = 1.0
        rows.append(x)
    return torch.cat(rows)


def _train_units(model: nn.Module, x: torch.Tensor, spool_dir: str, **settings: Any) -> list[str]:
    """Five steps of every=2, window=1; "training thread" for each torch.distributed collective step() called."""
    mon = layerwatch.watch(model, mode="offline", spool_dir=spool_dir, every=2, window=1, **settings)
    callers, stepping = [], threading.Event()
    all_reduce = dist.all_reduce

    def watched(*args: Any, **kwargs: Any) -> Any:
        if stepping.is_set() and threading.current_thread() is threading.main_thread():
            callers.append("training thread")
        return all_reduce(*args, **kwargs)

    dist.all_reduce = watched
    try:
        for _ in range(5):
            model(x).sum().backward()
            stepping.set()
            mon.step(loss=torch.tensor(1.0))
            stepping.clear()
            model.zero_grad()
        mon.close()
    finally:
        dist.all_reduce = all_reduce
    return callers


def _units_worker(rank: int, world: int, port: int, spool_dir: str, per_rank: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = _unit_batch(world)[3 * rank : 3 * (rank + 1)]
        callers = _train_units(DistributedDataParallel(_unit_model()), x, spool_dir, per_rank=per_rank)
        Path(out, f"{rank}.json").write_text(json.dumps(callers))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("world", "per_rank"), [(2, False), (4, False), (2, True)])
def test_dead_units_are_the_global_batchs_and_reduced_off_the_training_thread(
    tmp_path: Path, world: int, per_rank: bool
):
    _train_units(_unit_model(), _unit_batch(world), str(tmp_path / "one"))
    want = _rows(read_spool(tmp_path / "one"))
    mp.spawn(_units_worker, args=(world, _free_port(), str(tmp_path / "job"), per_rank, str(tmp_path)), nprocs=world)
    batches = read_spool(tmp_path / "job")
    senders = {b["rank"] for b in batches for s in b["steps"] if s["step"] < 4}  # step 4: the last partial report
    assert senders == (set(range(world)) if per_rank else {0})
    dead = [want["layer", "1", step]["dead_frac"] for step in range(5)]
    assert dead == [0.5 if world == 2 else 0.0] * 5  # on each rank's own share 0.75: 3 of 4 units dead
    for rank in range(world) if per_rank else [0]:
        got = _rows([b for b in batches if b["rank"] == rank])
        # Each window OR-ed across the ranks, but those of the run's last report (step 4): each rank's own.
        assert [got["layer", "1", step]["dead_frac"] for step in range(5)] == [*dead[:4], 0.75]
        assert got["layer", "0", 0]["dead_frac"] is None  # the Linear's units are measured at its ReLU
    for rank in range(world):
        assert json.loads(Path(tmp_path, f"{rank}.json").read_text()) == []


def test_a_non_finite_gradient_is_traced_to_the_first_rank_whose_own_norm_was_not_finite():
    """DDP averages a NaN gradient into every rank's: the ranks' own norms, taken before, say where it came from."""
    from layerwatch.ranks import Combined, Part
    from layerwatch.report import Report, StepMeta

    steps = [StepMeta(step=s, time=float(s), calls=layerwatch.recorder.StepCalls()) for s in (10, 11)]
    report = Report(steps=steps, layers=[], bounded=[], dead_windows=[], param_numel=[], flat=None)
    per_rank = [  # (world, [loss x 2, step time x 2, own gradient norm x 2])
        [1.0, 1.0, 0.1, 0.1, 2.0, 3.0],
        [1.0, 1.0, 0.1, 0.1, 5.0, math.nan],
        [1.0, 1.0, 0.1, 0.1, 4.0, math.inf],
    ]
    empty = torch.zeros(0, dtype=torch.float64)  # no layers
    combined = Combined(report, Part(empty, empty, torch.tensor(per_rank, dtype=torch.float64)), 3)
    origin = {"step": 11, "pass": "backward", "layer": "0.weight", "rank": 0}
    assert combined.origin_rank(origin, [], 10) == 1
    wire_steps: list[dict[str, Any]] = [{"loss": 1.0, "scalars": {}} for _ in steps]
    combined.spread(wire_steps)
    assert wire_steps[0]["scalars"]["grad_norm_rank_max"] == 5.0
    assert wire_steps[0]["scalars"]["grad_norm_argmax_rank"] == 1.0
    assert math.isnan(wire_steps[1]["scalars"]["grad_norm_rank_max"])  # a NaN counts as the largest
    assert wire_steps[1]["scalars"]["grad_norm_argmax_rank"] == 1.0
    assert combined.ranks()["grad_norm_mean"] == [2.5, 5.0, 4.0]
