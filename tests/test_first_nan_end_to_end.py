"""The first NaN against a real collector: the early report raises `non_finite` mid-interval, the collector's alert
comes back deduplicated against the client's own, and the run goes on with every step once."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from torch import nn

import layerwatch
from layerwatch.alerts import Alert
from tests.service.server import running_server
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow]


def test_a_nan_at_step_3_of_10_reaches_a_real_collector_before_step_5(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'nan.db'}"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db_url], check=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    heard: list[tuple[int, Alert]] = []
    current = -1

    def train(mon: layerwatch.Monitor, steps: range) -> None:
        nonlocal current
        for current in steps:
            if current == 3:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
            model(torch.randn(16, 8)).pow(2).mean().backward()
            mon.step(loss=model(torch.randn(4, 8)).mean().detach(), lr=0.01)
            model.zero_grad()

    with running_server(db_url, log_path=tmp_path / "server.log", args=("--no-auth",)) as (base, _):
        mon = layerwatch.watch(
            model, run_name="nan", project="nan", url=base, every=10, on_alert=lambda a: heard.append((current, a))
        )
        train(mon, range(5))
        assert [(step, a.rule, a.source) for step, a in heard] == [(3, "non_finite", "local")]
        # The loop stands at step 4, far from step 9's report: the collector must raise it from the early batch.
        with httpx.Client(base_url=base) as http:
            alerts = wait_until(
                lambda: http.get("/api/v1/alerts", params={"project": "nan", "state": "firing"}).json(), 30
            )
            assert [(a["rule"], a["step"]) for a in alerts] == [("non_finite", 3)]
            assert "first at step 3 (forward, layer 2)" in alerts[0]["message"]
            run_id = alerts[0]["run_id"]
            # the ingest answer brings it back; it replaces the local one
            wait_until(lambda: [a.source for a in mon.alerts] == ["collector"], 30, lambda: mon.alerts)
            assert [(a.rule, a.id, a.source) for a in mon.alerts] == [("non_finite", alerts[0]["id"], "collector")]
            train(mon, range(5, 25))
            mon.close()
            assert len(heard) == 1  # one incident, one call: the collector's alert was deduplicated
            loss = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}).json()["points"]
            assert [p["step"] for p in loss] == list(range(25))  # the early batch and the ones after it, once each
            run = http.get(f"/api/v1/runs/{run_id}").json()
            assert run["status"] == "finished"
