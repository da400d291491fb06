"""``scripts/demo --exit`` end to end, on free ports and a temporary data directory: it starts the MLflow UI and
the collector, trains the high-lr MLP, prints the alert and the MLflow run page, and stops.

It runs the demo's steps with this interpreter (LAYERWATCH_DEMO_SETUP=0): scripts/setup itself (creating .venv,
pip) is what `scripts/test` just ran before pytest.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
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
        "LAYERWATCH_DEMO_STEPS": "140",  # layer 3 crosses the dead_units threshold at step 99, it fires at 119 (for: 2)
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


def _second_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "demo"), "--exit"], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def first_demo(tmp_path):
    """What a running demo leaves: its ports taken (a listening socket on each), its logs in its data folder."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "mlflow.log").write_text("the first demo's log\n")
    listeners = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        listeners.append(sock)
    env = {
        **os.environ,
        "LAYERWATCH_DEMO_SETUP": "0",
        "LAYERWATCH_DEMO_PYTHON": sys.executable,
        "LAYERWATCH_DEMO_DIR": str(data),
        "LAYERWATCH_PORT": str(listeners[0].getsockname()[1]),
        "MLFLOW_PORT": str(listeners[1].getsockname()[1]),
    }
    yield data, env
    for sock in listeners:
        sock.close()


def test_a_second_demo_on_busy_ports_refuses_before_touching_anything(first_demo):
    data, env = first_demo
    done = _second_demo(env)
    assert done.returncode == 1
    assert f"port {env['LAYERWATCH_PORT']} on 127.0.0.1 is in use (another scripts/demo" in done.stderr
    assert "LAYERWATCH_PORT=" in done.stderr and "LAYERWATCH_DEMO_DIR=" in done.stderr  # how to run one beside it
    assert "Starting" not in done.stdout
    assert sorted(p.name for p in data.iterdir()) == ["mlflow.log"]
    assert (data / "mlflow.log").read_text() == "the first demo's log\n"


def test_a_second_demo_on_the_same_data_folder_refuses(first_demo):
    data, env = first_demo
    env = {**env, "LAYERWATCH_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}  # free ports, same data
    with open(data / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running demo holds it
        done = _second_demo(env)
    assert done.returncode == 1 and f"{data} is in use by a running demo" in done.stderr
    assert (data / "mlflow.log").read_text() == "the first demo's log\n"
