"""A real Prometheus scrapes a real collector; a layer's dead_frac is read back through its HTTP API."""

from __future__ import annotations

import time

import httpx
import pytest

from layerwatch_server.storage import migrations

from .batches import make_batch, post, unique
from .prometheus_server import running_prometheus
from .server import running_server

pytestmark = pytest.mark.slow


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
