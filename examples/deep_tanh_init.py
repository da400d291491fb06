"""A 10-layer tanh net and its initialisation: too small vanishes, too large saturates, Xavier is healthy.

python examples/deep_tanh_init.py --init small    # std 0.01: activations and gradients shrink layer by layer
python examples/deep_tanh_init.py --init large    # std 1.0: tanh outputs pinned at +-1, gradients die there
python examples/deep_tanh_init.py --init xavier   # Xavier/Glorot: no alert
"""

from __future__ import annotations

import torch
from _common import parser, report
from torch import nn

import layerwatch


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--init", choices=("small", "large", "xavier"), default="small")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    torch.manual_seed(0)
    width = 128
    layers: list[nn.Module] = []
    for _ in range(10):
        linear = nn.Linear(width, width)
        if args.init == "small":
            nn.init.normal_(linear.weight, std=0.01)
        elif args.init == "large":
            nn.init.normal_(linear.weight, std=1.0)
        else:
            nn.init.xavier_uniform_(linear.weight, gain=nn.init.calculate_gain("tanh"))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    inputs = torch.randn(2048, width)
    labels = (inputs[:, :10]).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with layerwatch.watch(model, run_name=f"tanh10-{args.init}", project=args.project, url=args.url, every=10) as mon:
        for _ in range(args.steps):
            batch = torch.randint(0, len(inputs), (128,))
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            mon.step(loss=loss, lr=0.01)
            opt.step()
            opt.zero_grad()
    report(mon)


if __name__ == "__main__":
    main()
