"""A ReLU layer fed inputs that are almost all negative: every unit is dead from the first step.

    python examples/negative_inputs.py              # features all negative, positive weights: dead_units
    python examples/negative_inputs.py --healthy    # the same net on standardised features: no alert

The first layer's weights start positive and its inputs are negative, so every pre-activation is negative:
no unit of the ReLU ever fires, no gradient reaches the first layer, and the net cannot learn.
"""

from __future__ import annotations

import torch
from _common import parser, report
from torch import nn

import layerwatch


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--healthy", action="store_true", help="standardise the inputs")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    inputs = -torch.rand(2048, 16) * 3 - 0.1  # every feature negative
    targets = inputs.sum(1, keepdim=True).sin()
    if args.healthy:
        inputs = (inputs - inputs.mean(0)) / inputs.std(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.uniform_(0.0, 0.3)  # positive weights, as after a few unlucky updates
        model[0].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    name = "negative-inputs" + ("-standardised" if args.healthy else "")
    with layerwatch.watch(model, run_name=name, project=args.project, url=args.url, every=10) as mon:
        for _ in range(args.steps):
            batch = torch.randint(0, len(inputs), (64,))
            loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
            loss.backward()
            mon.step(loss=loss, lr=0.05)
            opt.step()
            opt.zero_grad()
    report(mon)


if __name__ == "__main__":
    main()
