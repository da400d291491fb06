"""The detection suite: small models trained for real that fail in known ways, healthy controls, a page receiver,
and three published loss-spike detectors to compare with. ``bench/detection.py`` runs all of it and prints the
table; ``test_detection.py`` runs a fast subset.

Each scenario builds a :class:`Train`: ``backward(i)`` (zero_grad, loss, backward), then the caller's
``mon.step()``, then ``update()`` (clip, optimizer step), as a training loop does.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import json
import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import torch
from torch import nn

import layerwatch
from tests.service.server import free_port


# -- published detectors on a loss series --------------------------------------------------------------------
def kill_loss_spike(losses: list[float], window: int = 100, multiplier: float = 2.0, patience: int = 4) -> list[bool]:
    """llm-foundry's KillLossSpike: above ``multiplier`` x the running mean for ``patience`` steps in a row."""
    out, run = [], 0
    for i, x in enumerate(losses):
        past = losses[max(0, i - window) : i]
        run = run + 1 if len(past) == window and x > multiplier * statistics.fmean(past) else 0
        out.append(run >= patience)
    return out


def mean_std(losses: list[float], window: int, k: float, least: int) -> list[bool]:
    """Above mean + ``k`` standard deviations of the last ``window`` losses (once ``least`` are known)."""
    out = []
    for i, x in enumerate(losses):
        past = losses[max(0, i - window) : i]
        out.append(len(past) >= least and x > statistics.fmean(past) + k * statistics.pstdev(past))
    return out


PUBLISHED: dict[str, Callable[[list[float]], list[bool]]] = {
    "killspike": kill_loss_spike,
    "olmo6sd": lambda xs: mean_std(xs, 128, 6.0, 20),
    "z3_30": lambda xs: mean_std(xs, 30, 3.0, 30),
}


def rising_edges(flags: list[bool]) -> list[int]:
    return [i for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1])]


# -- the page receiver --------------------------------------------------------------------------------------
class Pager:
    """Every notification the collector sends, by run name."""

    def __init__(self) -> None:
        self.pages: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.pages.setdefault(body["run"]["name"], []).append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def firing(self, run: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.pages.get(run, []) if p["status"] == "firing"]


# -- scenarios ----------------------------------------------------------------------------------------------
_SEED_OFFSET = contextvars.ContextVar("seed_offset", default=0)


def manual_seed(k: int) -> None:
    """``torch.manual_seed(k)``, shifted by the offset of the variant being built (0 for the suite's own runs)."""
    torch.manual_seed(k + _SEED_OFFSET.get())


@dataclass
class Scenario:
    name: str
    expect: tuple[str, ...]  # rules that must page (empty: a healthy control)
    build: Callable[[], Train]
    steps: int
    note: str
    fault_at: int | None = None  # where the failure starts (None: from step 0, or the first non-finite loss)
    allowed: dict[str, int] = field(default_factory=dict)  # pages a control may raise (the data switch)

    def reseeded(self, offset: int) -> Scenario:
        """The same scenario, named ``name#offset``, with every torch seed its builder sets shifted by ``offset``:
        other initial weights and batches, the same data (the data sets seed generators of their own)."""

        def build() -> Train:
            token = _SEED_OFFSET.set(offset)
            try:
                return self.build()
            finally:
                _SEED_OFFSET.reset(token)

        return dataclasses.replace(self, name=f"{self.name}#{offset}", build=build)


class Train:
    """One training step split where ``mon.step()`` goes: ``backward(i)`` (zero_grad, loss, backward; returns the
    loss) then, after ``mon.step()``, ``update(i)`` (clip, optimizer step), as a training loop does."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[int], torch.Tensor],
                 clip: float | None = None, sched: Callable[[int], float] | None = None) -> None:  # fmt: skip
        self.model, self.opt, self.loss_of, self.clip, self.sched = model, opt, loss_of, clip, sched

    def backward(self, i: int) -> torch.Tensor:
        if self.sched is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.sched(i)
        self.opt.zero_grad()
        loss = self.loss_of(i)
        loss.backward()
        return loss.detach()

    def update(self) -> None:
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()


def mlp(widths: list[int], act: type[nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(widths[:-1]):
        mods += [nn.Linear(a, b), act()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*mods, nn.Linear(widths[-2], widths[-1]))


def teacher_task(n: int = 4096, dim: int = 32, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, (x @ torch.randn(dim, classes, generator=g)).argmax(1)


def classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> Callable[[int], torch.Tensor]:
    def loss_of(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (batch,))
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    return loss_of


def markov_tokens(vocab: int = 64, seq: int = 32, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Sequences from a random sparse Markov chain: learnable structure for a tiny language model."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=1)
    out = torch.empty(n, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seq):
        out[:, t] = torch.multinomial(trans[out[:, t - 1]], 1, generator=g).squeeze(1)
    return out


def tiny_gpt() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def lm_loss(model: nn.Module, data: torch.Tensor, batch: int) -> Callable[[int], torch.Tensor]:
    def loss_of(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(data), (batch,))
        return model(input_ids=data[idx], labels=data[idx]).loss

    return loss_of


def cosine(base: float, warmup: int, total: int) -> Callable[[int], float]:
    def lr(i: int) -> float:
        if i < warmup:
            return base * (i + 1) / warmup
        return base * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))

    return lr


def gpt_lr_growth(rate: float, start: int = 150) -> Callable[[], Train]:
    """Tiny GPT-2, SGD, healthy for ``start`` steps, then the learning rate grows by ``rate`` a step (a bad
    schedule), no clipping: NaN, sooner the faster it grows."""

    def build() -> Train:
        manual_seed(0)
        model, data = tiny_gpt(), markov_tokens()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return Train(model, opt, lm_loss(model, data, 8),
                     sched=lambda i: 0.05 if i < start else 0.05 * (1 + rate) ** (i - start))  # fmt: skip

    return build


def gpt_diverge() -> Train:
    """Healthy for 150 steps, then the learning rate climbs 4% a step (a bad schedule), no clipping: NaN."""
    return gpt_lr_growth(0.04)()


def mlp_classifier(sched: Callable[[int], float]) -> Train:
    """An MLP classifier, SGD with momentum at ``sched(i)``: the divergences of a learning rate gone wrong."""
    manual_seed(0)
    model, (x, y) = mlp([32, 128, 128, 10]), teacher_task()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Train(model, opt, classifier(model, x, y, 64), sched=sched)


def mlp_lr_jump() -> Train:
    """An MLP classifier healthy for 300 steps, then a learning rate 100x too high (a unit bug): diverges."""
    return mlp_classifier(lambda i: 0.05 if i < 300 else 5.0)


def mlp_lr_growth(rate: float, start: int = 300) -> Callable[[], Train]:
    """The MLP classifier of ``mlp_lr_jump``, its learning rate growing by ``rate`` a step from ``start``: the
    loss climbs and falls back for hundreds of steps, and may reach a NaN late or never."""
    return lambda: mlp_classifier(lambda i: 0.05 if i < start else 0.05 * (1 + rate) ** (i - start))


def rnn_blowup() -> Train:
    """A ReLU RNN with a recurrent matrix of spectral radius 2 and a high learning rate: blows up in warm-up."""
    manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(8, 64, nonlinearity="relu", batch_first=True)
            self.head = nn.Linear(64, 8)
            with torch.no_grad():
                self.rnn.weight_hh_l0.copy_(2.0 * torch.linalg.qr(torch.randn(64, 64))[0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    x, y = torch.randn(512, 12, 8), torch.randint(0, 8, (512,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    return Train(model, opt, classifier(model, x, y, 32))


def deep_tanh(std: float) -> Callable[[], Train]:
    def build() -> Train:
        manual_seed(0)
        model = mlp([32] + [64] * 9 + [1], act=nn.Tanh)
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        x, y = torch.randn(256, 32), torch.randn(256, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        return Train(model, opt, lambda i: nn.functional.mse_loss(model(x), y))

    return build


def dead_layer() -> Train:
    """Every first-layer pre-activation negative: two hidden ReLU layers dead from the start."""
    manual_seed(0)
    model = mlp([16, 64, 64, 64, 1])
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.fill_(-0.1)
    x, y = -torch.rand(512, 16), torch.randn(512, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return Train(model, opt, lambda i: nn.functional.mse_loss(model(x), y))


def bad_batch() -> Train:
    """One corrupted batch at step 400 (its loss 20x), on an otherwise healthy MLP regression."""
    manual_seed(0)
    model = mlp([8, 64, 64, 1])
    x, y = torch.randn(2048, 8), torch.randn(2048, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_of(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        return loss * 20 if i == 400 else loss

    return Train(model, opt, loss_of)


def stuck() -> Train:
    """Learning well, then the learning rate is set to 0 at step 300 (a scheduler bug): the loss stops moving."""
    manual_seed(0)
    model, (x, y) = mlp([32, 128, 10]), teacher_task()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Train(model, opt, classifier(model, x, y, 64), sched=lambda i: 0.05 if i < 300 else 0.0)


def gpt_cosine() -> Train:
    manual_seed(1)
    model, data = tiny_gpt(), markov_tokens(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return Train(model, opt, lm_loss(model, data, 8), clip=1.0, sched=cosine(3e-3, 100, 1000))


def batch2() -> Train:
    """Batch size 2 on an easy task: a quarter of the batch losses near 0, single batches 10-30x the median."""
    manual_seed(2)
    model, (x, y) = mlp([32, 64, 10]), teacher_task(classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return Train(model, opt, classifier(model, x, y, 2))


def dropout_wd() -> Train:
    manual_seed(3)
    model, (x, y) = mlp([32, 256, 256, 10], dropout=0.3), teacher_task()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return Train(model, opt, classifier(model, x, y, 32))


def sparse_relu() -> Train:
    """Wide ReLU layers pushed sparse by an L1 penalty on their activations (most units off on most inputs)."""
    manual_seed(4)
    model, (x, y) = mlp([32, 512, 512, 10]), teacher_task()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(i: int) -> torch.Tensor:
        idx = torch.randint(0, len(x), (64,))
        h = model[1](model[0](x[idx]))
        h2 = model[3](model[2](h))
        return nn.functional.cross_entropy(model[4](h2), y[idx]) + 1e-3 * (h.mean() + h2.mean())

    return Train(model, opt, loss_of)


def bert_frozen() -> Train:
    """Partial fine-tuning: BERT's embeddings and first two layers frozen after ``watch`` starts (grad None)."""
    from transformers import BertConfig, BertForSequenceClassification

    manual_seed(5)
    cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(cfg)
    data = markov_tokens(seed=5)
    labels = (data[:, :8].sum(1) % 2).long()
    frozen = [model.bert.embeddings, *model.bert.encoder.layer[:2]]
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=5e-4, weight_decay=0.01)

    def loss_of(i: int) -> torch.Tensor:
        if i == 0:
            for m in frozen:
                m.requires_grad_(False)
        idx = torch.randint(0, len(data), (16,))
        return model(input_ids=data[idx], labels=labels[idx]).loss

    return Train(model, opt, loss_of)


def clipped() -> Train:
    """A high learning rate held in check by clipping the gradient norm to 1 (the norm before clipping is seen)."""
    manual_seed(6)
    model, (x, y) = mlp([32, 128, 128, 10]), teacher_task()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Train(model, opt, classifier(model, x, y, 32), clip=1.0)


def slow() -> Train:
    """Slow steady convergence: plain SGD at a small learning rate."""
    manual_seed(7)
    model, (x, y) = mlp([32, 64, 64, 10]), teacher_task()
    opt = torch.optim.SGD(model.parameters(), lr=0.003)
    return Train(model, opt, classifier(model, x, y, 32))


def data_switch() -> Train:
    """A deliberate switch to another task at step 600: the loss jumps once, then trains down again."""
    manual_seed(8)
    model = mlp([32, 128, 10])
    tasks = [teacher_task(seed=0), teacher_task(seed=1)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_of(i: int) -> torch.Tensor:
        x, y = tasks[i >= 600]
        idx = torch.randint(0, len(x), (32,))
        return nn.functional.cross_entropy(model(x[idx]), y[idx])

    return Train(model, opt, loss_of)


def cnn() -> Train:
    manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))  # fmt: skip
    x = torch.randn(1024, 1, 12, 12)
    y = (x[:, 0, :6].mean((1, 2)) > x[:, 0, 6:].mean((1, 2))).long() + 2 * (x[:, 0, :, :6].mean((1, 2)) > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Train(model, opt, classifier(model, x, y, 32))


def gru() -> Train:
    manual_seed(10)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model = Net()
    x = torch.randn(1024, 10, 8)
    y = (x[:, :, 0].sum(1) > 0).long() + 2 * (x[:, :, 1].sum(1) > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Train(model, opt, classifier(model, x, y, 32), clip=1.0)


SCENARIOS = [
    Scenario("gpt-diverge", ("loss_spike", "exploding_gradients"), gpt_diverge, 600,
             "tiny GPT-2, SGD, lr +4%/step from step 150, no clipping"),
    Scenario("mlp-lr-jump", ("loss_spike", "exploding_gradients"), mlp_lr_jump, 600,
             "MLP, lr x100 at step 300", fault_at=300),
    Scenario("rnn-blowup", ("loss_spike", "exploding_gradients"), rnn_blowup, 100,
             "ReLU RNN, spectral radius 2, lr 0.5 (blows up in warm-up)"),
    Scenario("tanh-vanishing", ("vanishing_gradients",), deep_tanh(0.01), 40, "10-layer tanh, std 0.01 init"),
    Scenario("tanh-saturation", ("saturation",), deep_tanh(1.0), 60, "10-layer tanh, std 1.0 init"),
    Scenario("dead-relu", ("dead_units",), dead_layer, 60, "ReLU MLP with all pre-activations negative"),
    Scenario("bad-batch", ("loss_spike",), bad_batch, 600, "MLP, one batch's loss x20 at step 400", fault_at=400),
    Scenario("lr-zero", ("loss_plateau",), stuck, 1200, "MLP, lr set to 0 at step 300 (loss_plateau opted in)",
             fault_at=300),
    Scenario("gpt-warmup-cosine", (), gpt_cosine, 1000, "tiny GPT-2, AdamW wd 0.1, warm-up 100 + cosine, clip 1"),
    Scenario("batch2-noisy", (), batch2, 1500, "MLP, batch size 2"),
    Scenario("dropout-wd", (), dropout_wd, 1000, "MLP, dropout 0.3, AdamW weight decay"),
    Scenario("sparse-relu", (), sparse_relu, 800, "wide ReLU MLP with an L1 activation penalty"),
    Scenario("bert-frozen", (), bert_frozen, 600, "tiny BERT, embeddings + 2 of 4 layers frozen"),
    Scenario("clipped", (), clipped, 1000, "MLP, lr 0.1 momentum 0.9, clip 1"),
    Scenario("slow", (), slow, 1500, "MLP, SGD lr 0.003"),
    Scenario("data-switch", (), data_switch, 1200, "MLP, task switched at step 600", fault_at=600,
             allowed={"loss_spike": 1}),
    Scenario("cnn", (), cnn, 800, "small CNN, SGD momentum"),
    Scenario("gru", (), gru, 800, "GRU classifier, Adam, clip 1"),
]  # fmt: skip

DIVERGENCES = [  # the sweep's divergence variants: a learning rate that grows, at several rates
    *(Scenario(f"gpt-lr+{r:.0%}", ("loss_spike", "exploding_gradients"), gpt_lr_growth(r), 800,
               f"tiny GPT-2, SGD, lr +{r:.0%}/step from step 150, no clipping", fault_at=150)
      for r in (0.02, 0.04, 0.08)),
    *(Scenario(f"mlp-lr+{r:.0%}", ("loss_spike", "exploding_gradients"), mlp_lr_growth(r), 1200,
               f"MLP, SGD momentum, lr +{r:.0%}/step from step 300", fault_at=300)
      for r in (0.01, 0.03)),
]  # fmt: skip


def sweep(control_offsets: tuple[int, ...] = (100, 200, 300),
          divergence_offsets: tuple[int, ...] = (0, 1, 2, 3)) -> list[Scenario]:  # fmt: skip
    """Held-out runs: every healthy control with its seeds shifted by each of ``control_offsets``, and every
    divergence variant with each of ``divergence_offsets`` (0: the seeds of the suite's own runs)."""
    controls = [sc.reseeded(o) for o in control_offsets for sc in SCENARIOS if not sc.expect]
    return controls + [sc.reseeded(o) for o in divergence_offsets for sc in DIVERGENCES]


# -- running ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    scenario: Scenario
    losses: list[float]
    norms: list[float]
    steps: int
    pages: list[dict[str, Any]]  # the firing notifications that reached the webhook
    alerts: list[dict[str, Any]]  # the run's alerts in the API (one per rule and layer)
    seconds: float

    @property
    def first_nonfinite(self) -> int | None:
        return next((i for i, x in enumerate(self.losses) if not math.isfinite(x)), None)


def run(sc: Scenario, url: str, pager: Pager, *, plateau: bool = False, steps: int | None = None) -> Result:
    """Train ``sc`` under ``layerwatch.watch`` (default settings; ``loss_plateau``, off by default, opted in when
    ``plateau`` or expected), stop at the first non-finite loss, and wait until the collector's notifications for
    the run have left (none pending)."""
    train = sc.build()
    losses: list[float] = []
    norms: list[float] = []  # the total gradient norm, as the client computes it (for --dump)
    rules = {"loss_plateau": {"enabled": True}} if plateau or "loss_plateau" in sc.expect else None
    t0 = time.perf_counter()
    with layerwatch.watch(train.model, run_name=sc.name, project="detection", url=url, flush_timeout=60,
                          rules=rules) as mon:  # fmt: skip
        for i in range(steps or sc.steps):
            loss = train.backward(i)
            mon.step(loss=loss)
            grads = [p.grad.norm() for p in train.model.parameters() if p.grad is not None]
            norms.append(float(torch.stack(grads).norm()) if grads else math.nan)
            train.update()
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                break  # a run stops at its first NaN (non_finite pages it)
    seconds = time.perf_counter() - t0
    assert mon.run_id, "the collector never answered"
    alerts = wait_for_notifications(url, mon.run_id)
    return Result(sc, losses, norms, len(losses), pager.firing(sc.name), alerts, seconds)


def wait_for_notifications(url: str, run_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    """The run's alerts, once no notification of theirs is still pending (delivered, or failed)."""
    deadline = time.monotonic() + timeout
    while True:
        alerts = httpx.get(f"{url}/api/v1/alerts", params={"run_id": run_id, "limit": 1000}).json()
        pending = [
            n
            for a in alerts
            if a["fired_at"]
            for n in httpx.get(f"{url}/api/v1/alerts/{a['id']}").json()["notifications"]
            if n["state"] == "pending"
        ]
        if not pending:
            return alerts
        if time.monotonic() > deadline:
            raise TimeoutError(f"notifications still pending after {timeout} s: {pending}")
        time.sleep(0.1)
