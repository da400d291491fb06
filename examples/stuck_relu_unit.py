"""A single ReLU unit learning to copy a ReLU, initialised "backwards": it is stuck at zero for good.

    python examples/stuck_relu_unit.py              # w = -1: the unit never fires, the loss stays high
    python examples/stuck_relu_unit.py --leaky      # LeakyReLU: a small gradient flows, it recovers
    python examples/stuck_relu_unit.py --positive   # w = +0.5: it converges, no alert

The target is relu(x). With a negative weight every output is 0 for positive x and the gradient through the
ReLU is exactly 0, so gradient descent has nothing to follow: the loss plateaus at a high level while the
gradient vanishes. A LeakyReLU keeps a slope for negative inputs and lets the weight cross zero.
"""

from __future__ import annotations

import torch
from _common import parser, report
from torch import nn

import layerwatch


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--leaky", action="store_true", help="LeakyReLU(0.1) instead of ReLU")
    p.add_argument("--positive", action="store_true", help="initialise the weight at +0.5")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    torch.manual_seed(0)
    inputs = torch.rand(1024, 1) * 4  # positive inputs: the backwards unit sees only negative pre-activations
    targets = torch.relu(inputs)
    model = nn.Sequential(nn.Linear(1, 1), nn.LeakyReLU(0.1) if args.leaky else nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(0.5 if args.positive else -1.0)
        model[0].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    name = "single-unit" + ("-leaky" if args.leaky else "") + ("-positive" if args.positive else "")
    # A per-run rule override: loss_plateau is off by default (a converged run plateaus too, docs/alerts.md); on
    # here, and scaled to this toy's few hundred steps: the last 60 steps' loss within 5% (or its noise) of the
    # 60 before is a plateau (the default patience, 300 steps, suits real jobs).
    rules = {"loss_plateau": {"enabled": True, "patience": 60, "window": 20, "min_delta": 0.05}}
    with layerwatch.watch(model, run_name=name, project=args.project, url=args.url, every=10, rules=rules) as mon:
        for _ in range(args.steps):
            batch = torch.randint(0, len(inputs), (32,))
            loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            loss.backward()
            mon.step(loss=loss, lr=0.05)
            opt.step()
            opt.zero_grad()
    print(f"final weight {model[0].weight.item():+.3f}, final loss {loss.item():.4f}")
    report(mon)


if __name__ == "__main__":
    main()
