"""``scripts/demo --exit`` end to end, on free ports and a temporary data directory: it starts the MLflow UI and
the collector, trains the high-lr MLP, prints the alert and the MLflow run page, and stops.

It runs the demo's steps with this interpreter (LAYERWATCH_DEMO_SETUP=0): scripts/setup itself (creating .venv,
pip) is what `scripts/test` just ran before pytest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server import free_port

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_the_alert_and_the_mlflow_run_page(tmp_path) -> None:
    port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "LAYERWATCH_DEMO_SETUP": "0",
        "LAYERWATCH_DEMO_PYTHON": sys.executable,
        "LAYERWATCH_DEMO_DIR": str(tmp_path / "data"),
        "LAYERWATCH_DEMO_STEPS": "140",  # the first dead_units alert fires at step 119
        "LAYERWATCH_PORT": str(port),
        "MLFLOW_PORT": str(mlflow_port),
        "LAYERWATCH_SPOOL_DIR": str(tmp_path / "spool"),
        "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("client", "service", ".")),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("LAYERWATCH_MLFLOW_TRACKING_URI", None)  # the demo shows the embedded default store
    done = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--exit"], env=env, capture_output=True, text=True, timeout=240
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"^\s+ALERT dead_units \[firing, warning\] layer 3 ", out, re.M), out
    page = re.search(rf"^MLflow run:\s+http://127\.0\.0\.1:{mlflow_port}/#/experiments/(\w+)/runs/(\w+)/", out, re.M)
    assert page, out
    # The run the URL names is in the embedded MLflow store next to the collector's database.
    from mlflow import MlflowClient

    store = MlflowClient(f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}")
    run = store.get_run(page.group(2))
    assert run.info.experiment_id == page.group(1)
    assert run.data.tags["layerwatch.alert.dead_units"] == "firing"
