"""Per-layer histograms: the bins against torch.bucketize, and the monitor's counts read back from the spool."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import layerwatch
from layerwatch import histograms
from tests.client.conftest import read_spool


def reference(t: torch.Tensor) -> list[int]:
    """The documented bins through torch.bucketize: [lo, hi) on the positive side, (-hi, -lo] on the negative
    side (bucketize's right=True / right=False), then the NaN count."""
    x = t.detach().float().reshape(-1).double()
    edges = torch.tensor(histograms.EDGES, dtype=torch.float64)
    nan = x.isnan()
    index = torch.where(x >= 0, torch.bucketize(x, edges, right=True), torch.bucketize(x, edges, right=False))
    return [*torch.bincount(index[~nan], minlength=histograms.BINS).tolist(), int(nan.sum())]


def awkward() -> torch.Tensor:
    """Values over 20 decades, every edge and its neighbours, both zeros, NaN and both infinities."""
    torch.manual_seed(0)
    x = torch.randn(4000) * torch.logspace(-12, 8, 4000)
    x[::9] = 0.0
    edges = torch.tensor(histograms.EDGES)
    specials = [-0.0, float("nan"), float("inf"), -float("inf"), 2.0**-149]
    return torch.cat(
        [x, edges, torch.nextafter(edges, edges * 2), torch.nextafter(edges, edges * 0), torch.tensor(specials)]
    )


def test_bins_are_documented():
    assert histograms.BINS == len(histograms.EDGES) + 1 == 87
    assert list(histograms.EDGES) == sorted(histograms.EDGES)
    assert histograms.EDGES[histograms.ZERO_BIN - 1 : histograms.ZERO_BIN + 1] == (-(2.0**-126), 2.0**-126)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_counts_equal_bucketize(dtype):
    x = awkward().to(dtype)
    assert histograms.histogram(x).tolist() == reference(x)


def test_counting_in_chunks_into_a_reused_buffer():
    x = torch.cat([awkward()] * 160)  # > 2 chunks, the last one partial
    assert x.numel() > 2 * histograms.CPU_CHUNK
    h = histograms.Histograms.for_params([])
    h.add_activation(0, x)
    h.add_activation(0, x[:1000].view(10, 100))  # a second call adds up, through the same buffer
    counts = histograms.fold(h._acts[:1])[0].tolist()
    assert counts == [a + b for a, b in zip(reference(x), reference(x[:1000]), strict=True)]


def test_counts_equal_histc_where_its_bins_are_ours():
    # torch.histc over one octave's range puts [1, 2) in its first bin alone when given the same edges.
    x = torch.rand(10_000) * 8  # [0, 8): octaves [1, 2), [2, 4), [4, 8) and smaller
    ours = histograms.histogram(x).tolist()
    one = histograms.ZERO_BIN + 1 + (0 - histograms.LOW_EXP) + 1  # the bin [2**0, 2**1)
    for k in range(3):
        lo, hi = 2.0**k, 2.0 ** (k + 1)
        inside = x[(x >= lo) & (x < hi)]
        assert ours[one + k] == int(torch.histc(inside, bins=1, min=lo, max=hi).item()) == inside.numel()


def offline(model: nn.Module, tmp_path: Path, **kwargs) -> layerwatch.Monitor:
    return layerwatch.watch(model, run_name="t", project="p", mode="offline", spool_dir=str(tmp_path), **kwargs)


def test_the_last_step_of_each_report_ships_activation_and_gradient_counts(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    mon = offline(model, tmp_path, every=3, histogram_every=3)
    seen: dict[int, dict[str, list[int]]] = {}
    for step in range(6):
        x = torch.randn(5, 8)
        with torch.no_grad():  # (the monitor skips no_grad calls: validation)
            hidden = model[0](x)
        out = model(x)
        out.sum().backward()
        seen[step] = {
            "0": reference(hidden),
            "1": reference(torch.relu(hidden)),
            "2": reference(out),
            "grad 0": reference(torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad])),
            "grad 2": reference(torch.cat([model[2].weight.grad.flatten(), model[2].bias.grad])),
        }
        mon.step(loss=out.sum())
        model.zero_grad()
    mon.close()
    batches = read_spool(tmp_path)
    sections = [b["histograms"] for b in batches if "histograms" in b]
    assert all(section["edges"] == list(histograms.EDGES) for section in sections)
    entries = [entry for section in sections for entry in section["layers"]]
    assert sorted({e["step"] for e in entries}) == [2, 5]  # the last step of each report, nothing else
    for e in entries:
        key = e["layer"] if e["kind"] == "activation" else f"grad {e['layer']}"
        assert [*e["counts"], e["nan"]] == seen[e["step"]][key], (e["step"], key)
    kinds = {(e["kind"], e["layer"]) for e in entries}
    assert kinds == {("activation", n) for n in "012"} | {("gradient", "0"), ("gradient", "2")}
    assert sum(next(e for e in entries if e["layer"] == "1" and e["step"] == 2)["counts"]) == 5 * 16


def test_histograms_off_sends_no_key(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = offline(model, tmp_path, every=2, histogram_every=0)
    for _ in range(4):
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    mon.close()
    assert not any("histograms" in b for b in read_spool(tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Branchy(nn.Module):
    """Rank 1 runs a module rank 0 never does: the ranks see different layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.extra = nn.Linear(4, 6), nn.ReLU(), nn.Tanh()

    def forward(self, x: torch.Tensor, branch: bool = False) -> torch.Tensor:
        out = self.act(self.fc(x))
        return self.extra(out) if branch else out


def _worker(rank: int, world: int, port: int, spool_dir: str, branch: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        model = DistributedDataParallel(Branchy())
        mon = layerwatch.watch(model, mode="offline", spool_dir=spool_dir, every=2, histogram_every=2)
        for step in range(2):
            x = torch.full((3, 4), float(rank + 1)) * (step + 1)
            model(x, branch and rank == 1).sum().backward()
            mon.step()
            model.zero_grad()
        mon.close()
    finally:
        dist.destroy_process_group()


def expected_relu(ranks: tuple[int, ...]) -> list[int]:
    torch.manual_seed(0)
    model = Branchy()
    with torch.no_grad():
        counts = [reference(model.act(model.fc(torch.full((3, 4), float(rank + 1)) * 2))) for rank in ranks]
    return [sum(column) for column in zip(*counts, strict=True)]


@pytest.mark.parametrize("branch", [False, True], ids=["same layers", "rank 1 has one more"])
def test_under_ddp_rank_0_sends_the_histograms_summed_over_ranks(tmp_path: Path, branch: bool):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), branch), nprocs=2, join=True)
    batches = read_spool(tmp_path)
    assert not any("histograms" in b for b in batches if b["rank"] == 1)
    entries = [e for b in batches if b["rank"] == 0 for e in b.get("histograms", {}).get("layers", [])]
    relu = next(e for e in entries if e["kind"] == "activation" and e["layer"] == "act")
    # Both ranks' activations; where the ranks disagree on their layers, rank 0's alone (and no hang).
    assert relu["step"] == 1 and [*relu["counts"], relu["nan"]] == expected_relu((0,) if branch else (0, 1))
    grad = next(e for e in entries if e["kind"] == "gradient" and e["layer"] == "fc")
    assert sum(grad["counts"]) == 4 * 6 + 6  # the (averaged) gradient once, not once per rank


def test_default_spacing_is_a_multiple_of_every_from_100_steps():
    assert layerwatch.Config.resolve(mode="offline").histogram_every_steps == 100
    assert layerwatch.Config.resolve(mode="offline", every=30).histogram_every_steps == 120
    assert layerwatch.Config.resolve(mode="offline", every=250).histogram_every_steps == 250
    assert layerwatch.Config.resolve(mode="offline", every=30, histogram_every=0).histogram_every_steps == 0
