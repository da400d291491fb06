"""What a user sees in MLflow: a training job develops a dead layer, a real collector mirrors it into a real
``mlflow server``, and the MLflow UI (driven in headless Chromium) lists the run under its experiment and shows
the layer's ``dead_frac`` on the run page and as a chart, and the run's health map in its image view."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import layerwatch
from tests.mlflow_ui import chrome, missing_browser, open_image, open_metric_chart, run_page, wait_for, wait_for_mirror
from tests.service.mlflow_server import running_mlflow
from tests.service.server import running_server
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser())),
]

PROJECT, RUN_NAME, METRIC = "ui-test", "negative-inputs", "relu/1/dead_frac"
LAST_STEP = 59


def train_a_dead_layer(url: str) -> None:
    """examples/negative_inputs.py in short: every pre-activation of the first layer is negative."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.uniform_(0.0, 0.3)
        model[0].bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with layerwatch.watch(model, run_name=RUN_NAME, project=PROJECT, url=url, every=10) as mon:
        for _ in range(LAST_STEP + 1):
            x = -torch.rand(64, 16) * 3 - 0.1
            loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
            loss.backward()
            mon.step(loss=loss, lr=0.05)
            opt.step()
            opt.zero_grad()


def test_mlflow_ui_shows_the_dead_layer(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'lw.db'}"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db], check=True)
    with running_mlflow(tmp_path) as mlflow_url:
        env = {"LAYERWATCH_MLFLOW_TRACKING_URI": mlflow_url, "LAYERWATCH_MLFLOW_INTERVAL_S": "0.5"}
        with running_server(db, log_path=tmp_path / "collector.log", env=env, args=("--no-auth",)) as (url, _):
            train_a_dead_layer(url)
            exp_id, run_id = wait_for_mirror(url, mlflow_url, PROJECT, METRIC)
            driver = chrome(tmp_path / "chromium")
            try:
                # The experiment's run table lists the run by its name.
                driver.get(f"{mlflow_url}/#/experiments/{exp_id}/runs")
                wait_for(driver, "body", text=RUN_NAME)
                # The run page: the layer metric and its latest value (every unit dead: 1).
                driver.get(run_page(mlflow_url, exp_id, run_id))
                wait_for(driver, "body", text=METRIC)
                rows = driver.find_element("css selector", "body").text.splitlines()
                assert rows[rows.index(METRIC) + 1] == "1", rows
                # The metric's chart, found with the chart search box.
                open_metric_chart(driver, mlflow_url, exp_id, run_id, METRIC, fullscreen=False)
                # The health map the mirror logged at the run's end, in the run's image view.
                wait_until(lambda: health_map_at(mlflow_url, run_id, LAST_STEP), 60, "the run's last health map")
                image = open_image(driver, mlflow_url, exp_id, run_id, "layerwatch/health_map", LAST_STEP)
                assert image.is_displayed() and image.size["width"] > 100  # MLflow's preview: 256 px wide at most
            except Exception:
                driver.save_screenshot(str(tmp_path / "failure.png"))
                raise
            finally:
                driver.quit()


def health_map_at(mlflow_url: str, run_id: str, step: int) -> bool:
    from mlflow import MlflowClient

    files = [f.path for f in MlflowClient(mlflow_url).list_artifacts(run_id, "images")]
    return any(f"layerwatch~health_map+step+{step}+" in path for path in files)
