"""Each failure example in ``examples/`` run as a user runs it, against one real collector process: the positive
variant prints the alerts it promises, the healthy variant prints none.

The examples run two at a time (one torch thread each) while the tests read their output, so the file takes
about as long as its slowest pair. ``--steps`` is cut to a little past the step where the alert fires.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.service.server import running_server

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
HEALTHY: set[str] = set()

# (script, flags) -> the rules whose alerts it must print; HEALTHY: "layerwatch raised no alert".
CASES: dict[tuple[str, tuple[str, ...]], set[str]] = {
    ("negative_inputs.py", ("--steps", "50")): {"dead_units", "vanishing_gradients"},
    ("negative_inputs.py", ("--healthy", "--steps", "50")): HEALTHY,
    ("stuck_relu_unit.py", ("--steps", "150")): {"dead_units", "vanishing_gradients", "loss_plateau"},
    ("stuck_relu_unit.py", ("--leaky", "--steps", "150")): HEALTHY,
    ("stuck_relu_unit.py", ("--positive", "--steps", "150")): HEALTHY,
    ("high_lr_dead_units.py", ("--steps", "140")): {"dead_units"},
    ("high_lr_dead_units.py", ("--lr", "0.05", "--steps", "140")): HEALTHY,
    ("deep_tanh_init.py", ("--init", "small", "--steps", "30")): {"vanishing_gradients"},
    ("deep_tanh_init.py", ("--init", "large", "--steps", "30")): {"saturation"},
    ("deep_tanh_init.py", ("--init", "xavier", "--steps", "30")): HEALTHY,
    ("pooled_features_nan.py", ()): {"loss_spike", "exploding_gradients", "non_finite"},
    ("pooled_features_nan.py", ("--norm",)): HEALTHY,
}
ALERT = re.compile(r"^\s+ALERT (\S+) \[(\w+), (\w+)\]", re.M)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, tuple[str, ...]], Future]]:
    """Start one collector and every example against it; each test waits for its own example's output."""
    tmp = tmp_path_factory.mktemp("examples")
    db = f"sqlite:///{tmp / 'lw.db'}"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db], check=True)
    env = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off"}
    with running_server(db, log_path=tmp / "collector.log", env=env, args=("--no-auth",)) as (url, _):
        run_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
            "LAYERWATCH_SPOOL_DIR": str(tmp / "spool"),
        }

        def run(script: str, flags: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, str(ROOT / "examples" / script), "--url", url, *flags]
            return subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)

        # The slowest first, so the pool ends with short ones.
        order = sorted(CASES, key=lambda case: case[0] != "high_lr_dead_units.py")
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {case: pool.submit(run, *case) for case in order}
            yield futures
            for future in futures.values():
                future.cancel()


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: " ".join([case[0].removesuffix(".py"), *case[1]]))
def test_example_prints_the_alerts_it_promises(case, outputs) -> None:
    done = outputs[case].result(timeout=180)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    printed = {rule for rule, _state, _severity in ALERT.findall(out)}
    expected = CASES[case]
    if expected is HEALTHY:
        assert "layerwatch raised no alert" in out, out
        assert not printed, out
    else:
        assert printed == expected, out
