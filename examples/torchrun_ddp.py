"""DDP under torchrun: every rank reports, and all ranks land in one run.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_ddp.py              # CPU (gloo)
    torchrun --standalone --nproc-per-node 8 examples/torchrun_ddp.py --steps 500  # GPUs (NCCL), one per rank

Nothing in the script names the collector: ``layerwatch.watch()`` reads ``LAYERWATCH_URL`` / ``LAYERWATCH_TOKEN``
(online) or, without a URL, writes to the spool at ``LAYERWATCH_SPOOL_DIR`` (offline; upload later with
``layerwatch sync``). The run key comes from torchrun's rendezvous id (``TORCHELASTIC_RUN_ID``) or, under Slurm,
from ``SLURM_JOB_ID``, so every rank computes the same key without talking to the others. Rank 0 sends the
statistics combined across ranks (``act_std`` of the global batch; a unit is dead only if it is inactive on every
rank's share of the batch), with the spread of the loss and step time across ranks; ``LAYERWATCH_PER_RANK=1`` has
each rank send its own rows instead.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import layerwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--every", type=int, default=None, help="steps per report (default: LAYERWATCH_EVERY or 10)")
    parser.add_argument("--project", default="examples")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(args, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)  # the same data and initial weights on every rank
    inputs = torch.randn(2048, 32)
    labels = (inputs @ torch.randn(32, 10)).argmax(1)
    data = TensorDataset(inputs, labels)
    loader = DataLoader(data, batch_size=64, sampler=DistributedSampler(data))  # each rank its own shard
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    model = DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    criterion = nn.CrossEntropyLoss()

    # Called on every rank, after init_process_group; layer names are those of the unwrapped model.
    # The `with` block closes the run as "finished", or "failed" when training raises.
    with layerwatch.watch(
        model, run_name="torchrun-ddp", project=args.project, every=args.every, config=vars(args)
    ) as mon:
        if dist.get_rank() == 0:
            print(f"layerwatch run key {mon.run_key} ({dist.get_world_size()} ranks)", flush=True)
        step, epoch = 0, 0
        while step < args.steps:
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                loss = criterion(model(x.to(device)), y.to(device))
                loss.backward()  # DDP all-reduces the gradients here
                mon.step(loss=loss, lr=opt.param_groups[0]["lr"])  # after backward, before zero_grad
                opt.step()
                opt.zero_grad()
                step += 1
                if step == args.steps:
                    break
            epoch += 1


if __name__ == "__main__":
    main()
