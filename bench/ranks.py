"""Rows a job sends per world size, reports combined across ranks or per rank, and the cost of the combining.

    python bench/ranks.py                     # worlds 1, 2, 4 on gloo (CPU): ~1 min on 2 cores
    python bench/ranks.py --worlds 1 2 --steps 20

Each world runs the real client in offline mode on a 20-block Linear+ReLU MLP (40 watched layers, 40
parameters, ``every=10``) under DDP, once with ``per_rank=False`` (rank 0 sends the rows combined across the
ranks) and once with ``per_rank=True``; the rows are counted in the spool. Then the per-report collective alone:
``RankReducer.combine`` (a layout check, then a SUM and a MAX all_reduce of the raw sums and extremes and an
all_gather of each rank's loss and step times, on the exporter thread, gloo) on vectors of the sizes a report of
that model has, timed over 20 reports after 3 to warm up, on rank 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

BLOCKS, WIDTH, EVERY = 20, 64, 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, spool: str, steps: int, per_rank: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    logging.getLogger("layerwatch").setLevel(logging.ERROR)  # the spool's "data wait in ..." notes
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import layerwatch
        from layerwatch.ranks import Part, RankReducer

        torch.manual_seed(0)
        layers = [m for _ in range(BLOCKS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())]
        model = DistributedDataParallel(nn.Sequential(*layers)) if world > 1 else nn.Sequential(*layers)
        mon = layerwatch.watch(model, mode="offline", spool_dir=spool, every=EVERY, per_rank=per_rank)
        for _ in range(steps):
            loss = model(torch.randn(16, WIDTH)).square().mean()
            loss.backward()
            mon.step(loss=loss)
            model.zero_grad()
        mon.close()
        if world > 1 and not per_rank:
            cells = 2 * BLOCKS * EVERY  # layers x steps of one report
            part = Part(
                torch.randn(cells * 6, dtype=torch.float64),  # additive raw columns and element counts
                torch.randn(cells * 3, dtype=torch.float64),  # max, -min, first non-finite rank
                torch.randn(2 * EVERY, dtype=torch.float64),  # loss and step time per step
            )
            size = 8 * (part.sums.numel() + part.highs.numel() + part.ranks.numel())
            reducer, took = RankReducer(), []
            for i in range(23):
                start = time.perf_counter()
                assert reducer.combine("layout", part) is not None
                if i >= 3:
                    took.append(time.perf_counter() - start)
            if rank == 0:
                Path(out).write_text(f"{statistics.median(took) * 1e3:.3f} {max(took) * 1e3:.3f} {size}")
    finally:
        dist.destroy_process_group()


def _rows(spool: Path) -> int:
    from layerwatch import spool as spool_module
    from layerwatch import wire

    rows = 0
    for segment in spool.rglob(f"*{spool_module.SUFFIX}"):
        for _, payload in spool_module.read_records(segment):
            batch = wire.decode(payload)
            rows += sum(len(s["layers"]) + len(s["params"]) for s in batch["steps"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"{BLOCKS * 2} layers + {BLOCKS * 2} params, {args.steps} steps, every={EVERY}, gloo on CPU")
    print(f"{'world':>5} {'rows combined':>14} {'rows per rank':>14} {'gather ms (median/max)':>24} {'bytes/rank':>11}")
    for world in args.worlds:
        rows, cost, nbytes = {}, "-", "-"
        for per_rank in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp, "cost.txt")
                spawn_args = (world, _free_port(), str(Path(tmp, "spool")), args.steps, per_rank, str(out))
                mp.spawn(_worker, args=spawn_args, nprocs=world, join=True)
                rows[per_rank] = _rows(Path(tmp, "spool"))
                if out.exists():
                    median, worst, size = out.read_text().split()
                    cost = f"{median} / {worst}"
                    nbytes = size
        print(f"{world:>5} {rows[False]:>14} {rows[True]:>14} {cost:>24} {nbytes:>11}")


if __name__ == "__main__":
    main()
