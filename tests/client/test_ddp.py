"""DDP on two real processes (gloo), per_rank=True: one run for the job, each rank's rows, dead masks OR-reduced
across ranks."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.client.conftest import layer_rows, read_spool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, spool_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import layerwatch

        linear = nn.Linear(4, 4)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(4))
            linear.bias.zero_()
        model = DistributedDataParallel(nn.Sequential(linear, nn.ReLU()))
        mon = layerwatch.watch(model, mode="offline", spool_dir=spool_dir, every=2, per_rank=True)
        for _ in range(4):
            x = -torch.ones(3, 4)
            x[:, rank] = 1.0  # rank 0 keeps unit 0 alive, rank 1 unit 1; units 2 and 3 die everywhere
            model(x).sum().backward()
            mon.step(loss=torch.tensor(1.0))
            model.zero_grad()
        mon.close()
    finally:
        dist.destroy_process_group()


def test_ranks_share_one_run_and_dead_masks_are_global(tmp_path: Path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    batches = read_spool(tmp_path)
    assert {b["run"]["key"] for b in batches} != set() and len({b["run"]["key"] for b in batches}) == 1
    assert {b["rank"] for b in batches} == {0, 1}
    assert {b["run"]["world_size"] for b in batches} == {2}
    for rank in (0, 1):
        mine = [b for b in batches if b["rank"] == rank]
        assert [e["name"] for e in mine[0]["layers"]] == ["0", "1"]  # named as in the unwrapped model
        rows = layer_rows(mine, "1")
        # Locally 3 of 4 units are dead; across the global batch only 2 are.
        assert rows[1]["dead_frac"] == 0.5 and rows[3]["dead_frac"] == 0.5
        assert rows[1]["zero_frac"] == 0.75


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
