"""A real Prometheus scrapes a real collector; a layer's dead_frac is read back through its HTTP API, and the
default model shape, sent by the real client, feeds the dead-unit alert rule and the Grafana panels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from torch import nn

import layerwatch
from layerwatch_server.storage import migrations

from .batches import make_batch, post, unique
from .prometheus_server import running_prometheus
from .server import running_server

pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_prometheus_reads_a_layers_dead_frac(tmp_path):
    db = f"sqlite:///{tmp_path}/lw.db"
    migrations.upgrade(db)
    env = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off"}
    with running_server(db, log_path=tmp_path / "server.log", env=env, args=("--no-auth",)) as (base, _):
        run_id = post(httpx.Client(base_url=base), make_batch(unique("run"), steps=range(10))).json()["run_id"]
        with running_prometheus(tmp_path, [base.removeprefix("http://")]) as prom:
            query = f'layerwatch_layer_dead_frac{{run="{run_id}", layer="blocks.1.fc"}}'
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                result = httpx.get(f"{prom}/api/v1/query", params={"query": query}).json()["data"]["result"]
                if result:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("Prometheus never saw the series")
            rows = httpx.get(f"{prom}/api/v1/query", params={"query": "layerwatch_ingest_rows_total"}).json()
    assert float(result[0]["value"][1]) == pytest.approx(9000 + 1 + 0.4)
    assert result[0]["metric"]["project"] == "proj"
    assert {r["metric"]["kind"] for r in rows["data"]["result"]} == {"step", "layer", "param"}


def _dead_model() -> nn.Sequential:
    """The default model shape (Linear, ReLU, ..., Linear head) with dead units by construction: positive
    weights into negative inputs kill every unit of ReLU `1`; ReLU `3` sees only its Linear's bias, negative
    for half of the units; the head's outputs are all negative (an output head, not dead units)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.zero_()
        model[2].bias.copy_(torch.tensor([1.0] * 8 + [-1.0] * 8))
        model[4].weight.zero_()
        model[4].bias.fill_(-1.0)
    return model


def _query(prom: str, expr: str) -> list[dict]:
    return httpx.get(f"{prom}/api/v1/query", params={"query": expr}).json()["data"]["result"]


def test_default_model_shape_feeds_the_dead_unit_rule_and_the_dashboard(tmp_path):
    """nn.Sequential(Linear, ReLU, ...) through the real client: the Linear layers send dead_frac = null (their
    ReLU reports the units), yet every dead-unit series is there, and so is what rules.yml and Grafana read."""
    db = f"sqlite:///{tmp_path}/lw.db"
    migrations.upgrade(db)
    env = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off"}
    with running_server(db, log_path=tmp_path / "server.log", env=env, args=("--no-auth",)) as (base, _):
        model = _dead_model()
        mon = layerwatch.watch(model, run_name="mlp", project="prom", url=base, every=5, mode="online")
        for _ in range(20):
            x = -torch.rand(32, 8) - 0.1
            model(x).pow(2).mean().backward()
            mon.step(loss=torch.tensor(1.0), lr=0.0)
            model.zero_grad()
        mon.close()
        run_id = httpx.get(f"{base}/api/v1/runs", params={"project": "prom"}).json()[0]["id"]
        with running_prometheus(tmp_path, [base.removeprefix("http://")]) as prom:
            units = f'layerwatch_run_dead_units_frac{{run="{run_id}"}}'
            deadline = time.monotonic() + 30
            while not _query(prom, units):
                if time.monotonic() > deadline:
                    pytest.fail(f"Prometheus never saw {units}")
                time.sleep(0.5)
            layers = {
                r["metric"]["layer"]: float(r["value"][1])
                for r in _query(prom, f'layerwatch_layer_dead_frac{{run="{run_id}"}}')
            }
            run_level = {
                name: float(_query(prom, f'layerwatch_run_{name}{{run="{run_id}"}}')[0]["value"][1])
                for name in ("dead_frac_max", "dead_units_frac")
            }
            rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
            rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TrainingDeadUnits")
            rule_hits = _query(prom, rule["expr"])
            dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "layerwatch.json").read_text())
            panels = {
                target["expr"]: _query(prom, target["expr"].replace("$project", "prom").replace("$run", run_id))
                for panel in dashboard["panels"]
                for target in panel.get("targets", [])
                if "dead" in target["expr"]
            }
    # The Linear layers 0 and 2 have no dead_frac of their own; the head's is shown as measured.
    assert layers == {"1": 1.0, "3": 0.5, "4": 1.0}
    # Run level, as the dead_units rule reads it: ReLU 1 and 3, 32 units, 24 dead (the head left out).
    assert run_level == {"dead_frac_max": 1.0, "dead_units_frac": 0.75}
    assert [(r["metric"]["run"], float(r["value"][1])) for r in rule_hits] == [(run_id, 0.75)]
    assert len(panels) == 3 and all(panels.values()), panels
