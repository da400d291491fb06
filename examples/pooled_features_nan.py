"""Pooled features that grow until the loss spikes and turns NaN, and the normalisation that fixes it.

    python examples/pooled_features_nan.py           # sum-pooled features: the loss spikes, then turns NaN
    python examples/pooled_features_nan.py --norm    # LayerNorm after pooling: trains smoothly, no alert

Sum pooling over a long sequence makes the head's input grow with the sequence and with every update of the
encoder. A warm-up of 30 steps at a small learning rate goes well; at the full rate, which is fine for normalised
features, the updates overshoot: within a few steps the loss spikes by orders of magnitude, the features explode
and the loss turns Inf, then NaN. layerwatch reports the spike, the NaN, and where the first non-finite value
appeared.
"""

from __future__ import annotations

import torch
from _common import parser, report
from torch import nn

import layerwatch

WARMUP_LR, WARMUP_STEPS, LR = 1e-4, 30, 2e-3


class Net(nn.Module):
    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.norm = nn.LayerNorm(32) if norm else nn.Identity()
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, 8)
        pooled = self.encoder(x).sum(dim=1)  # (batch, 32): sum pooling, unbounded in the sequence length
        return self.head(self.norm(pooled))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--norm", action="store_true", help="LayerNorm after the pooling")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    torch.manual_seed(0)
    inputs = torch.randn(512, 64, 8)
    targets = inputs[:, :, 0].mean(1, keepdim=True)
    model = Net(args.norm)
    with torch.no_grad():
        model.head.weight.mul_(0.01)  # start with a small output: the loss begins low and well-behaved
        model.head.bias.fill_(0.05)  # positive: a one-unit output below zero for a window reads as dead
    opt = torch.optim.SGD(model.parameters(), lr=WARMUP_LR, momentum=0.9)
    name = "sum-pooling" + ("-layernorm" if args.norm else "")
    with layerwatch.watch(model, run_name=name, project=args.project, url=args.url, every=5) as mon:
        for step in range(args.steps):
            lr = WARMUP_LR if step < WARMUP_STEPS else LR
            for group in opt.param_groups:
                group["lr"] = lr
            batch = torch.randint(0, len(inputs), (32,))
            loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            loss.backward()
            mon.step(loss=loss, lr=lr)
            opt.step()
            opt.zero_grad()
    print(f"final loss {loss.item()}")
    report(mon)


if __name__ == "__main__":
    main()
