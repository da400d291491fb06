"""FSDP2 (``fully_shard``) on two real processes (gloo, CPU): parameter statistics from the local shards,
combined across ranks, equal the unsharded model's."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.client.conftest import read_spool
from tests.client.test_ddp import _free_port

STEPS, LR = 4, 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 7 rows over 2 ranks shard unevenly (4 + 3); the last bias (3) leaves rank 1 with 1 row
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _reference(batches: list[torch.Tensor]) -> list[dict[str, list[float]]]:
    """The unsharded model's statistics per step, by parameter name: grad_norm, grad_max_abs, weight_norm,
    update_ratio (lr * grad_norm / weight_norm)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for x in batches:
        model(x).square().mean().backward()
        out.append(
            {
                name: [
                    p.grad.norm().item(),
                    p.grad.abs().max().item(),
                    p.detach().norm().item(),
                    LR * p.grad.norm().item() / p.detach().norm().item(),
                ]
                for name, p in model.named_parameters()
            }
        )
        opt.step()
        opt.zero_grad()
    return out


def _worker(rank: int, world: int, port: int, spool_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        import layerwatch

        torch.manual_seed(1)
        batches = [torch.randn(6, 5) for _ in range(STEPS)]  # the same batch on both ranks
        if rank == 0:
            Path(spool_dir, "reference.json").write_text(json.dumps(_reference(copy.deepcopy(batches))))
        model = _model()
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        mon = layerwatch.watch(model, mode="offline", spool_dir=spool_dir, every=2, param_every=1, per_rank=True)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for x in batches:
            model(x).square().mean().backward()
            mon.step(lr=LR)
            opt.step()
            opt.zero_grad()
        mon.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_parameter_statistics_equal_the_unsharded_models(tmp_path: Path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    reference = json.loads((tmp_path / "reference.json").read_text())
    batches = read_spool(tmp_path)
    stats = batches[0]["param_stats"]
    for rank in (0, 1):
        mine = [b for b in batches if b["rank"] == rank]
        names = {p["index"]: p["name"] for p in mine[0]["params"]}
        assert sorted(names.values()) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # as in the model
        assert {p["name"]: p["shape"] for p in mine[0]["params"]}["0.weight"] == [7, 5]  # the whole parameter
        steps = sorted((s for b in mine for s in b["steps"]), key=lambda s: s["step"])
        assert [s["step"] for s in steps] == list(range(STEPS))
        for step in steps:
            for row in step["params"]:
                got = dict(zip(stats, row[1:], strict=True))
                want = reference[step["step"]][names[row[0]]]
                assert got["grad_norm"] == pytest.approx(want[0], rel=1e-5)
                assert got["grad_max_abs"] == pytest.approx(want[1], rel=1e-5)
                assert got["weight_norm"] == pytest.approx(want[2], rel=1e-5)
                assert got["update_ratio"] == pytest.approx(want[3], rel=1e-5)
                assert got["grad_nonfinite"] == 0
