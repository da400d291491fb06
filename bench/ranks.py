"""Rows a job sends per world size, reports combined across ranks or per rank, and the cost of the combining.

    python bench/ranks.py                     # worlds 1, 2, 4 on gloo (CPU): ~2 min on 2 cores
    python bench/ranks.py --worlds 1 2 --steps 20

Each world runs the real client in offline mode on a 20-block Linear+ReLU MLP (40 watched layers, 40
parameters, ``every=10``) under DDP, once with ``per_rank=False`` (rank 0 sends the rows combined across the
ranks) and once with ``per_rank=True``; the rows are counted in the spool. Then the per-report collective alone:
``RankReducer.combine`` (a layout check, then a SUM and a MAX all_reduce of the raw sums and extremes and an
all_gather of each rank's loss, step times and own gradient norms, on the exporter thread, gloo) on vectors of the
sizes a report of that model has, and the dead-unit window's OR (``RankReducer.any``: a size check and a bitwise-OR
all_reduce of the packed unit bits) for that model's 1,280 units and for 200 layers of 4,096 units, each timed over
20 calls after 3 to warm up, on rank 0.

Last, the comm hook that measures each rank's own gradient norm (``RankGradNorm``) against DDP's built-in
all-reduce, side by side: two DDP copies of the MLP on the same ranks, one hooked, trained in alternating steps
(forward, backward, SGD step; the hooked one also takes its norm as ``step()`` does), each step timed; printed:
the median step times and their ratio (medians: a shared machine's load spikes hit both alike), and the hook's own
arithmetic alone (``stats.sum_of_squares`` of the model's gradients as one bucket, median of 1,000 calls).
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
                torch.randn(3 * EVERY, dtype=torch.float64),  # loss, step time and own gradient norm per step
            )
            size = 8 * (part.sums.numel() + part.highs.numel() + part.ranks.numel())
            reducer = RankReducer()
            took = _timed(lambda: reducer.combine("layout", part))
            words = [-(-BLOCKS * 2 * WIDTH // 16) + 3, 200 * 4096 // 16 + 13]  # units, then the layers' calls
            small, large = (_timed(lambda n=n: reducer.any(torch.zeros(n, dtype=torch.int32), "units")) for n in words)
            if rank == 0:
                figures = [statistics.median(took) * 1e3, max(took) * 1e3, size]
                figures += [statistics.median(small) * 1e3, statistics.median(large) * 1e3]
                Path(out).write_text(" ".join(f"{f:.3f}" for f in figures))
            reducer.release()
    finally:
        dist.destroy_process_group()


def _timed(call) -> list[float]:
    took = []
    for i in range(23):
        start = time.perf_counter()
        assert call() is not None
        if i >= 3:
            took.append(time.perf_counter() - start)
    return took


def _hook_worker(rank: int, world: int, port: int, rounds: int, out: str) -> None:
    """Step time of a DDP MLP with the per-rank gradient norm's comm hook vs DDP's built-in all-reduce."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from layerwatch.distributed import RankGradNorm

        def mlp() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(*[m for _ in range(BLOCKS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())])

        bare, hooked = DistributedDataParallel(mlp()), DistributedDataParallel(mlp())
        norms = RankGradNorm(hooked)
        optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3) for m in (bare, hooked)}
        x = torch.randn(16, WIDTH)

        def step(model: nn.Module) -> float:
            start = time.perf_counter()
            model(x).square().mean().backward()
            if model is hooked:
                norms.take()
            optimizers[id(model)].step()
            model.zero_grad()
            return time.perf_counter() - start

        for _ in range(10):  # the hooked one installs its hook at its first take()
            step(bare), step(hooked)
        times: dict[str, list[float]] = {"bare": [], "hooked": []}
        for i in range(rounds):
            for name in ("bare", "hooked") if i % 2 == 0 else ("hooked", "bare"):
                times[name].append(step(bare if name == "bare" else hooked))
        if rank == 0:
            from layerwatch import stats

            bucket = torch.randn(sum(p.numel() for p in hooked.parameters()))
            alone = []
            for _ in range(1000):
                start = time.perf_counter()
                stats.sum_of_squares(bucket)
                alone.append(time.perf_counter() - start)
            bare_ms, hooked_ms = (statistics.median(times[name]) * 1e3 for name in ("bare", "hooked"))
            own_us = statistics.median(alone) * 1e6
            Path(out).write_text(f"{bare_ms:.4f} {hooked_ms:.4f} {hooked_ms / bare_ms:.4f} {own_us:.1f}")
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
    parser.add_argument("--rounds", type=int, default=400, help="steps per model for the comm hook's cost")
    args = parser.parse_args()
    print(f"{BLOCKS * 2} layers + {BLOCKS * 2} params, {args.steps} steps, every={EVERY}, gloo on CPU")
    print(
        f"{'world':>5} {'rows combined':>14} {'rows per rank':>14} {'combine ms (median/max)':>24} {'bytes/rank':>11}"
        f" {'window OR ms (1.3k / 819k units)':>33}"
    )
    for world in args.worlds:
        rows, cost, nbytes, window = {}, "-", "-", "-"
        for per_rank in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp, "cost.txt")
                spawn_args = (world, _free_port(), str(Path(tmp, "spool")), args.steps, per_rank, str(out))
                mp.spawn(_worker, args=spawn_args, nprocs=world, join=True)
                rows[per_rank] = _rows(Path(tmp, "spool"))
                if out.exists():
                    median, worst, size, small, large = out.read_text().split()
                    cost, nbytes, window = f"{median} / {worst}", str(int(float(size))), f"{small} / {large}"
        print(f"{world:>5} {rows[False]:>14} {rows[True]:>14} {cost:>24} {nbytes:>11} {window:>33}")
    worlds = [w for w in args.worlds if w > 1]
    if worlds:
        print(f"\nper-rank gradient norm comm hook vs DDP's built-in all-reduce, {BLOCKS * 2}-layer MLP, gloo")
        print(f"{'world':>5} {'bare ms/step':>13} {'hooked ms/step':>15} {'hooked/bare':>12} {'own work us/step':>17}")
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp, "hook.txt")
            mp.spawn(_hook_worker, args=(world, _free_port(), args.rounds, str(out)), nprocs=world, join=True)
            bare, hooked, ratio, own = out.read_text().split()
        print(f"{world:>5} {float(bare):>13.3f} {float(hooked):>15.3f} {float(ratio):>12.3f} {own:>17}")


if __name__ == "__main__":
    main()
