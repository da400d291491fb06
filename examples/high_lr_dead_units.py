"""An MLP trained with a too-high learning rate: a large share of its ReLU units die (and stay dead).

    python examples/high_lr_dead_units.py                 # lr 0.5: layers 3 and 5 lose most of their units
    python examples/high_lr_dead_units.py --lr 0.05       # the same net at a sane rate: nothing dies

Reports to the collector at --url / LAYERWATCH_URL (default http://127.0.0.1:8765), then prints what
layerwatch caught: the alerts it raised and each ReLU layer's share of dead units over the run.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

import torch
from _common import parser, report
from torch import nn

import layerwatch


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    torch.manual_seed(0)
    inputs = torch.randn(4096, 32)
    labels = (inputs @ torch.randn(32, 10)).argmax(1)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    run_name = f"mlp-lr{args.lr}"
    with layerwatch.watch(
        model, run_name=run_name, project=args.project, url=args.url, every=20, config={"lr": args.lr, "momentum": 0.9}
    ) as mon:
        for _ in range(args.steps):
            batch = torch.randint(0, len(inputs), (128,))
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            mon.step(loss=loss, lr=args.lr)
            opt.step()
            opt.zero_grad()
    print(f"final loss {loss.item():.3f}")
    report(mon)
    # Reading needs a read token (a job's write token cannot read): LAYERWATCH_READ_TOKEN, else LAYERWATCH_TOKEN.
    token = os.environ.get("LAYERWATCH_READ_TOKEN") or os.environ.get("LAYERWATCH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if mon.run_id:
        for layer in ("1", "3", "5"):
            query = urllib.parse.urlencode({"layer": layer, "stat": "dead_frac"})
            url = f"{args.url}/api/v1/runs/{mon.run_id}/series?{query}"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                    points = json.loads(response.read())["points"]
            except urllib.error.HTTPError as exc:
                print(f"  (no dead_frac history: HTTP {exc.code}; set LAYERWATCH_READ_TOKEN to a read token)")
                return
            dead = [p["value"] for p in points if isinstance(p["value"], float)]
            print(f"  ReLU layer {layer}: dead_frac {dead[0]:.2f} at the start -> {dead[-1]:.2f} at the end")

if __name__ == "__main__":
    main()
