"""The whole path for real: the client in a training loop -> a real collector process -> its database -> the
query API, on SQLite and on PostgreSQL, across a collector restart mid-run."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import layerwatch
from layerwatch.cli import main as cli
from tests.service.dbs import fresh_pg_database
from tests.service.server import free_port, running_server
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'e2e.db'}"
        subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", url], check=True)
        yield url
    else:
        with fresh_pg_database() as url:
            subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", url], check=True)
            yield url


def train(mon, model, steps: range) -> None:
    for _ in steps:
        x = torch.randn(16, 8)
        x[:, :4] = -1.0 - x[:, :4].abs()  # the first layer's units 0-3 see only negative inputs: dead
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss=loss, lr=0.01)
        model.zero_grad()


def test_training_run_survives_a_collector_restart_and_lands_exactly_once(db_url, tmp_path):
    port = free_port()
    model = nn.Sequential(nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with running_server(db_url, log_path=tmp_path / "a.log", args=("--no-auth",), port=port) as (base, _):
        mon = layerwatch.watch(
            model,
            run_name="e2e",
            project="e2e",
            url=base,
            every=5,
            timeout=2,
            max_backoff=0.5,
            rules={"dead_units": {"threshold": 0.4}},  # the half-dead first ReLU fires; `show` lists it
        )
        train(mon, model, range(0, 30))
        wait_until(lambda: mon.stats["delivered_batches"] >= 6, 20, lambda: f"6 batches delivered: {mon.stats}")
    train(mon, model, range(30, 60))  # collector down: batches spool to disk
    with running_server(db_url, log_path=tmp_path / "b.log", args=("--no-auth",), port=port) as (base, _):
        train(mon, model, range(60, 80))
        mon.close()
        assert mon.stats["spooled_bytes"] == 0
        with httpx.Client(base_url=base) as http:
            runs = http.get("/api/v1/runs", params={"project": "e2e"}).json()
            assert [(r["name"], r["status"]) for r in runs] == [("e2e", "finished")]
            assert (runs[0]["firing_alerts"], runs[0]["pending_alerts"]) == (1, 0)
            run_id = runs[0]["id"]
            loss = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}).json()["points"]
            assert [p["step"] for p in loss] == list(range(80))  # every step, once, in order
            dead = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "dead_frac", "layer": "0"}).json()
            assert [p["value"] for p in dead["points"]] == [0.5] * 16  # one value per 5-step window
            detail = http.get(f"/api/v1/runs/{run_id}").json()
            assert [layer["name"] for layer in detail["layers"]] == ["0", "1", "2", "3"]
            latest = http.get(f"/api/v1/runs/{run_id}/latest").json()
            assert latest["layers"][0]["dead_frac"] == 0.5 and latest["layers"][0]["step"] == 79
            # the ReLUs' dead_frac means dead units; the output head's does not
            assert [layer["dead_judged"] for layer in latest["layers"]] == [True, False, True, False]
        # The CLI for people reads the same API.
        runner = CliRunner()
        listed = runner.invoke(cli, ["runs", "--url", base])
        assert listed.exit_code == 0 and "e2e" in listed.output and "finished" in listed.output
        assert "1 firing" in listed.output  # the dead_units alert below
        shown = runner.invoke(cli, ["show", run_id, "--url", base])
        assert shown.exit_code == 0 and "ReLU" in shown.output
        assert "Ranks" in shown.output and "every=5" in shown.output
        open_alert = next(line for line in shown.output.splitlines() if line.startswith("│ dead_units"))
        assert "│ firing │" in open_alert and "layer 0: 50%" in open_alert
        tailed = runner.invoke(cli, ["tail", run_id, "--url", base, "--once"])
        assert tailed.exit_code == 0, tailed.output
        first_row = next(line for line in tailed.output.splitlines() if "ReLU" in line)
        assert "0.5" in first_row  # the half-dead ReLU layer is on top
        assert "Open alerts" in tailed.output and "│ dead_units" in tailed.output
