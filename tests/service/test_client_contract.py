"""The real client (``layerwatch.watch``) against a real collector process: the wire contract holds."""

from __future__ import annotations

import math

import httpx
import pytest

from .server import running_server

pytestmark = [pytest.mark.slow]


def test_real_client_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    import layerwatch

    url = f"sqlite:///{tmp_path}/contract.db"
    from layerwatch_server.storage.migrations import upgrade

    upgrade(url)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with running_server(url, log_path=tmp_path / "s.log", env={"LAYERWATCH_NO_AUTH": "1"}) as (base, _):
        mon = layerwatch.watch(
            model, run_name="contract", project="contract", url=base, every=1, spool_dir=str(tmp_path / "spool")
        )
        try:
            for _ in range(12):
                x = torch.randn(32, 8)
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(loss=loss, lr=0.01)
        finally:
            mon.close()
        runs = httpx.get(f"{base}/api/v1/runs", params={"project": "contract"}).json()
        assert len(runs) == 1 and runs[0]["status"] == "finished"
        detail = httpx.get(f"{base}/api/v1/runs/{runs[0]['id']}").json()
        names = {layer["name"] for layer in detail["layers"]}
        assert names and names <= {name for name, _ in model.named_modules()}
        loss = httpx.get(f"{base}/api/v1/runs/{runs[0]['id']}/series", params={"stat": "loss"}).json()
        assert len(loss["points"]) >= 10
        assert all(isinstance(p["value"], float) and math.isfinite(p["value"]) for p in loss["points"])
        layer = sorted(names)[0]
        act = httpx.get(
            f"{base}/api/v1/runs/{runs[0]['id']}/series", params={"stat": "act_mean", "layer": layer}
        ).json()
        assert len(act["points"]) >= 10
