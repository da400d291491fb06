"""Client overhead: median training-step time bare vs instrumented, side by side in one run.

    python bench/client_overhead.py               # MLP + small CNN on CPU; + ResNet-style and transformer on GPU
    python bench/client_overhead.py --steps 300 --models mlp
    python bench/client_overhead.py --compile --models gpt2,cnn   # eager and compiled, side by side

Prints, per model: bare and instrumented median step time (default settings, the same without histograms,
and every=1), their ratios, what the histograms add per step, from the mean step time with a histogram at every
report vs none (per round, side by side: a cost once per report hides from a median of steps), at every report
and at the default spacing (target <= 1% of a step),
host synchronisations per step made by the client on the training thread (must be 0), and the client's
extra device memory and host RSS. Targets: ratio <= 1.10 on CPU, <= 1.05 on GPU, 0 syncs per step.
Bare and instrumented steps alternate in blocks so drift of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
import layerwatch
from layerwatch.syncs import HostReads


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(784, 1024),
        nn.ReLU(),
        nn.Linear(1024, 1024),
        nn.ReLU(),
        nn.Linear(1024, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    return model, torch.randn(256, 784), torch.randint(0, 10, (256,))


def small_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def resnet_style() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    width = 64
    for channels in (64, 128, 256):
        layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.ReLU(), Block(channels), Block(channels)]
        width = channels
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 100))
    return model, torch.randn(128, 3, 64, 64), torch.randint(0, 100, (128,))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 8000, width: int = 512, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 8, 4 * width, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens))).flatten(0, 1)


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 8000, (32, 256))
    return TinyTransformer(), tokens, torch.randint(0, 8000, (32 * 256,))


class Gpt2Tiny(nn.Module):
    """transformers' GPT-2 from a tiny config (random weights, nothing downloaded), logits flattened for CE."""

    def __init__(self, layers: int, width: int, vocab: int, positions: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        sizes = {"n_layer": layers, "n_embd": width, "n_head": 4, "vocab_size": vocab, "n_positions": positions}
        config = GPT2Config(**sizes, bos_token_id=0, eos_token_id=0)
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=tokens).logits.flatten(0, 1)


def gpt2_tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    big = torch.cuda.is_available()
    layers, width, vocab, seq, batch = (4, 256, 4096, 128, 16) if big else (2, 128, 1024, 64, 8)
    tokens = torch.randint(0, vocab, (batch, seq))
    return Gpt2Tiny(layers, width, vocab, seq), tokens, torch.randint(0, vocab, (batch * seq,))


CPU_MODELS = {"mlp": mlp, "cnn": small_cnn, "gpt2": gpt2_tiny}
GPU_MODELS = {**CPU_MODELS, "resnet": resnet_style, "transformer": transformer}


def sync_now(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(model, opt, x, y, n: int, mon=None, counter: HostReads | None = None) -> list[float]:
    device = x.device
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(n):
        sync_now(device)
        start = time.perf_counter()
        with counter if counter is not None else contextlib.nullcontext():  # hooks, step(): the whole step
            loss = loss_fn(model(x), y)
            loss.backward()
            if mon is not None:
                mon.step(loss=loss, lr=0.01)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync_now(device)
        times.append(time.perf_counter() - start)
    return times


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_model(name: str, build, device: torch.device, steps: int, block: int, spool: str) -> None:
    torch.manual_seed(0)
    model, x, y = build()
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    timed_steps(model, opt, x, y, 5)  # warm-up: allocator, kernels, autotuning
    results: dict[str, list[float]] = {k: [] for k in ("bare", "every=10", "no histograms", "each report", "every=1")}
    monitors = {
        "every=10": layerwatch.watch(model, run_name=f"bench-{name}", mode="offline", spool_dir=spool),
    }
    mem_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rss_before = rss_mb()
    timed_steps(model, opt, x, y, 20, monitors["every=10"])  # discover layers, allocate buffers
    extra_device_mb = (torch.cuda.memory_allocated(device) - mem_before) / 2**20 if device.type == "cuda" else 0.0
    monitors["every=10"].close()
    monitors["every=1"] = layerwatch.watch(model, run_name=f"bench-{name}-1", mode="offline", spool_dir=spool, every=1)
    monitors["every=10"] = layerwatch.watch(model, run_name=f"bench-{name}", mode="offline", spool_dir=spool)
    monitors["no histograms"] = layerwatch.watch(  # every=10 as well: what the histograms cost, side by side
        model, run_name=f"bench-{name}-nohist", mode="offline", spool_dir=spool, histogram_every=0
    )
    monitors["each report"] = layerwatch.watch(
        model, run_name=f"bench-{name}-hist", mode="offline", spool_dir=spool, histogram_every=10
    )
    # Alternate blocks; a monitor not being measured is paused by detaching its hooks.
    rounds = max(steps // block, 1)
    for _ in range(rounds):
        for label in results:
            mon = monitors.get(label)
            for other_label, other in monitors.items():
                if other_label != label:
                    other.recorder.detach()
            if mon is not None:
                mon.recorder.detach()
                mon.recorder.attach(model, _watched(model, mon))
            results[label] += timed_steps(model, opt, x, y, block, mon)
    counter = HostReads()
    monitors["every=10"].recorder.detach()
    monitors["every=10"].recorder.attach(model, _watched(model, monitors["every=10"]))
    with counter:
        timed_steps(model, opt, x, y, 20, monitors["every=10"])
    syncs_per_step = len(counter.calls) / 20
    rss_after = rss_mb()
    for mon in monitors.values():
        mon.close()
    bare = statistics.median(results["bare"])
    cells = [f"{name:12s}", f"bare {bare * 1e3:8.2f} ms"]
    for label in ("every=10", "no histograms", "every=1"):
        t = statistics.median(results[label])
        cells.append(f"{label} {t * 1e3:8.2f} ms (x{t / bare:.3f})")
    # Per round, the "each report" block (one histogram step) minus the "no histograms" block next to it; the median
    # of these pairs: a load change on a shared machine hits both blocks of a pair alike.
    each, none = results["each report"], results["no histograms"]
    pairs = [sum(each[i : i + block]) - sum(none[i : i + block]) for i in range(0, len(each), block)]
    spacing = monitors["every=10"].config.histogram_every_steps
    share = 100 * statistics.median(pairs) / block / bare
    cells.append(f"histograms {share:+.2f}% of a step at each report, {share * 10 / spacing:+.2f}% every {spacing}")
    cells += [
        f"syncs/step {syncs_per_step:.1f}",
        f"+device {extra_device_mb:.2f} MB",
        f"+RSS {rss_after - rss_before:.1f} MB",
    ]
    print(" | ".join(cells), flush=True)
    del model, opt
    gc.collect()


def bench_compiled(name: str, build, device: torch.device, steps: int, block: int, spool: str) -> None:
    """Eager and torch.compile'd, each bare and instrumented (watch() then compile, default settings): four
    copies of one model trained in alternating blocks, ratios within each mode side by side."""
    torch.manual_seed(0)
    original, x, y = build()
    x, y = x.to(device), y.to(device)
    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer, layerwatch.Monitor | None]] = {}
    for label in ("bare", "instrumented", "bare compiled", "instrumented compiled"):
        model = copy.deepcopy(original).to(device)
        mon = None
        if label.startswith("instrumented"):
            mon = layerwatch.watch(model, run_name=f"bench-{name}-{label}", mode="offline", spool_dir=spool)
        forward = torch.compile(model) if label.endswith("compiled") else model
        variants[label] = (forward, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), mon)
    start = time.perf_counter()
    for forward, opt, mon in variants.values():
        timed_steps(forward, opt, x, y, 5, mon)  # warm-up: compilation, layer discovery, autotuning
    warmup = time.perf_counter() - start
    results: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(max(steps // block, 1)):
        for label, (forward, opt, mon) in variants.items():
            results[label] += timed_steps(forward, opt, x, y, block, mon)
    counter = HostReads()
    forward, opt, mon = variants["instrumented compiled"]
    with counter:
        timed_steps(forward, opt, x, y, 10, mon)
    for _, _, mon in variants.values():
        if mon is not None:
            mon.close()
    median = {label: statistics.median(times) for label, times in results.items()}
    print(
        f"{name:12s} | eager bare {median['bare'] * 1e3:8.2f} ms, instrumented {median['instrumented'] * 1e3:8.2f} ms"
        f" (x{median['instrumented'] / median['bare']:.3f}) | compiled bare {median['bare compiled'] * 1e3:8.2f} ms,"
        f" instrumented {median['instrumented compiled'] * 1e3:8.2f} ms"
        f" (x{median['instrumented compiled'] / median['bare compiled']:.3f})"
        f" | syncs/step (compiled) {len(counter.calls) / 10:.1f} | warm-up {warmup:.0f} s",
        flush=True,
    )


def _watched(model, mon):
    from layerwatch.layers import select

    cfg = mon.config
    return list(select(model, None, cfg.include, cfg.exclude, cfg.sat_margin))


def main() -> None:
    # The measured monitors spool offline and say so when they close: that would land between the result rows.
    logging.getLogger("layerwatch").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="measured steps per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per alternating block")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(GPU_MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--compile", action="store_true", help="eager and torch.compile'd, bare and instrumented")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    available = GPU_MODELS if device.type == "cuda" else CPU_MODELS
    names = args.models.split(",") if args.models else list(available)
    print(
        f"layerwatch {layerwatch.__version__} | torch {torch.__version__} | device {device}"
        f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})"
    )
    with tempfile.TemporaryDirectory() as spool:
        for name in names:
            bench = bench_compiled if args.compile else bench_model
            bench(name, available[name], device, args.steps, args.block, spool)


if __name__ == "__main__":
    main()
