"""The MLflow mirror against a real ``mlflow server``: runs, params, tags, metrics with steps, status, alerts."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from layerwatch import wire
from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.mirrors import source
from layerwatch_server.mirrors.mlflow_mirror import MirrorConfig, MlflowMirror
from layerwatch_server.mirrors.process import MirrorProcess, job_from_settings
from layerwatch_server.storage import migrations
from layerwatch_server.storage.engine import make_engine
from tests.waiting import wait_until

from .batches import make_batch, post, unique
from .mlflow_server import running_mlflow
from .server import free_port, running_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory):
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory, mlflow_url: str):
    url = f"sqlite:///{tmp_path_factory.mktemp('lw')}/lw.db"
    migrations.upgrade(url)
    engine = make_engine(url)
    settings = Settings(db_url=url, scheduler=False, no_auth=True, mlflow_tracking_uri=mlflow_url)
    with TestClient(create_app(settings, engine)) as client:
        yield client, engine
    engine.dispose()


def _mlflow(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def test_run_is_mirrored_with_params_tags_metrics_and_status(collector, mlflow_url, tmp_path):
    client, engine = collector
    mirror: MlflowMirror = client.app.state.lw.mlflow_mirror
    key, project = unique("run"), unique("proj")
    nan_at = {(3, 0, "act_std"): math.nan, (4, 1, "act_std"): math.inf}
    assert post(client, make_batch(key, steps=range(0, 6), project=project, overrides=nan_at)).status_code == 202
    mirror.tick(engine)
    run_id = post(client, make_batch(key, steps=range(6, 10), project=project, end="finished")).json()["run_id"]
    mirror.tick(engine)

    detail = client.get(f"/api/v1/runs/{run_id}").json()
    ml = _mlflow(mlflow_url)
    run = ml.get_run(detail["mlflow_run_id"])
    assert ml.get_experiment(run.info.experiment_id).name == project
    assert run.info.run_name == f"run {key}"
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.001" and run.data.params["model.watched_layers"] == "4"
    assert run.data.tags["layerwatch.world_size"] == "1" and run.data.tags["layerwatch.rank.0.host"] == "testhost"
    assert run.data.tags["mlflow.note.content"].startswith("Mirrored by layerwatch.")
    # Linear layers keyed as what they are; the last one, the output head, as such
    assert "output/blocks.3.fc/dead_frac" in run.data.metrics
    hist = ml.get_metric_history(run.info.run_id, "linear/blocks.0.fc/dead_frac")
    assert [m.step for m in hist] == list(range(10)) and hist[2].value == pytest.approx(2000.4)
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "loss")] == list(range(10))
    assert {"layerwatch/dead_frac_max", "layerwatch/grad_norm_max", "param/blocks.3.fc.weight/grad_norm"} <= set(
        run.data.metrics
    )
    # non-finite values are counted and tagged, never logged
    std = ml.get_metric_history(run.info.run_id, "linear/blocks.0.fc/act_std")
    assert 3 not in [m.step for m in std] and all(math.isfinite(m.value) for m in std)
    assert run.data.tags["layerwatch.nonfinite.first_step"] == "0"  # the user scalar "weird" is +Inf
    assert int(run.data.tags["layerwatch.nonfinite.values"]) == 10 + 2
    summary = json.loads(
        Path(ml.download_artifacts(run.info.run_id, "layerwatch/model_summary.json", tmp_path)).read_text()
    )
    assert [x["name"] for x in summary["layers"]][:2] == ["blocks.0.fc", "blocks.1.fc"]


def test_alerts_become_tags_and_an_artifact(collector, mlflow_url, tmp_path):
    client, engine = collector
    mirror: MlflowMirror = client.app.state.lw.mlflow_mirror
    run_id = post(client, make_batch(unique("run"), steps=range(3))).json()["run_id"]
    assert not mirror.mirror_alerts(engine, run_id, [])  # not in MLflow yet
    mirror.tick(engine)
    alert = {"id": 1, "rule": "dead_units", "severity": "warning", "state": "firing", "run_id": run_id,
             "layer": "blocks.0.fc", "step": 2, "value": 0.93, "threshold": 0.5, "message": "93% dead"}  # fmt: skip
    resolved = {**alert, "id": 2, "rule": "loss_spike", "state": "resolved", "layer": None, "value": math.nan}
    assert mirror.mirror_alerts(engine, run_id, [alert, resolved])
    ml_id = client.get(f"/api/v1/runs/{run_id}").json()["mlflow_run_id"]
    tags = _mlflow(mlflow_url).get_run(ml_id).data.tags
    assert tags["layerwatch.alert.dead_units"] == "firing" and tags["layerwatch.alert.loss_spike"] == "resolved"
    assert tags["layerwatch.alert.dead_units.layers"] == "blocks.0.fc"
    listed = json.loads(
        Path(_mlflow(mlflow_url).download_artifacts(ml_id, "layerwatch/alerts.json", tmp_path)).read_text()
    )
    assert [a["rule"] for a in listed] == ["dead_units", "loss_spike"] and listed[1]["value"] == "NaN"


def test_mlflow_down_backs_off_and_resumes_from_the_cursor(collector, mlflow_url):
    client, engine = collector
    down = MlflowMirror(MirrorConfig(tracking_uri=f"http://127.0.0.1:{free_port()}"))
    run_id = post(client, make_batch(unique("run"), steps=range(5))).json()["run_id"]
    client.app.state.lw.mlflow_mirror.tick(engine)  # the real mirror takes the other pending runs
    source.reset(engine, run_id)
    down.tick(engine)
    assert down.errors_total == 1 and source.pending_runs(engine, 10, run_id)[0].mlflow_run_id is None
    down.tick(engine)  # inside the backoff: not even tried
    assert down.errors_total == 1
    down._client, down._retry_at = _mlflow(mlflow_url), 0.0  # the server is back
    down.tick(engine)
    state = source.pending_runs(engine, 10, run_id)[0]
    assert state.cursor == 4 and state.mlflow_run_id is not None and down.errors_total == 1


def test_backfill_remirrors_a_run_into_a_new_mlflow_run(collector, mlflow_url):
    client, engine = collector
    mirror: MlflowMirror = client.app.state.lw.mlflow_mirror
    run_id = post(client, make_batch(unique("run"), steps=range(7), end="killed")).json()["run_id"]
    mirror.tick(engine)
    first = source.pending_runs(engine, 1, run_id)[0].mlflow_run_id
    assert mirror.backfill(engine, run_id) == 6
    second = source.pending_runs(engine, 1, run_id)[0].mlflow_run_id
    assert second != first and _mlflow(mlflow_url).get_run(second).info.status == "KILLED"
    assert len(_mlflow(mlflow_url).get_metric_history(second, "loss")) == 7


def test_real_collector_mirrors_in_the_background(tmp_path, mlflow_url):
    db = f"sqlite:///{tmp_path}/lw.db"
    migrations.upgrade(db)
    env = {"LAYERWATCH_MLFLOW_TRACKING_URI": mlflow_url, "LAYERWATCH_MLFLOW_INTERVAL_S": "1"}
    server = running_server(db, log_path=tmp_path / "server.log", env=env, args=("--no-auth",))
    with server as (base, server), httpx.Client(base_url=base) as http:
        run_id = post(http, make_batch(unique("run"), steps=range(20), end="failed")).json()["run_id"]

        def mirrored_as_failed() -> str | None:
            ml_id = http.get(f"/api/v1/runs/{run_id}").json()["mlflow_run_id"]
            return ml_id if ml_id and _mlflow(mlflow_url).get_run(ml_id).info.status == "FAILED" else None

        ml_id = wait_until(mirrored_as_failed, 30, "the run to be mirrored as FAILED")
        mirror_pid = _mirror_pid(make_engine(db))
        assert mirror_pid != server.pid and _running(mirror_pid)  # a process of its own, beside the collector's
        assert os.sched_getscheduler(mirror_pid) == os.SCHED_IDLE  # on CPU time ingest leaves over
        assert os.sched_getscheduler(server.pid) == os.SCHED_OTHER
    assert len(_mlflow(mlflow_url).get_metric_history(ml_id, "layerwatch/dead_frac_max")) == 20
    assert not _running(mirror_pid)  # stopped with the collector


def _mirror_pid(engine) -> int:
    """The process that ran the latest mirror tick (lease rows name it ``host:pid:mirror``)."""
    from sqlalchemy import select

    from layerwatch_server.storage.models import JobTick

    with engine.connect() as conn:
        replica = conn.scalar(select(JobTick.replica).where(JobTick.job == "mlflow").order_by(JobTick.tick.desc()))
    engine.dispose()
    return int(replica.split(":")[-2])


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not reaped by an init-less container, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_mirror_process_is_restarted_and_carries_on_from_the_cursor(tmp_path, mlflow_url):
    db = f"sqlite:///{tmp_path}/lw.db"
    migrations.upgrade(db)
    engine = make_engine(db)
    settings = Settings(
        db_url=db, scheduler=False, no_auth=True, mlflow_tracking_uri=mlflow_url, mlflow_interval_s=0.5
    )
    key = unique("run")
    with TestClient(create_app(settings, engine)) as client:
        run_id = post(client, make_batch(key, steps=range(5))).json()["run_id"]

        def cursor() -> int | None:
            return source.pending_runs(engine, 1, run_id)[0].cursor

        mirror = MirrorProcess(job_from_settings(settings))
        mirror.start()
        try:
            # the counters are published when the tick that moved the cursor returns
            wait_until(lambda: cursor() == 4 and mirror.metrics_total > 0, 60, lambda: f"the cursor at 4: {cursor()}")
            first = mirror.pid
            assert first is not None and first != os.getpid()
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: mirror.restarts == 1 and mirror.pid != first, 30, "the mirror process restarted")
            post(client, make_batch(key, steps=range(5, 9)))
            wait_until(lambda: cursor() == 8, 60, lambda: f"the cursor at step 8, not {cursor()}")
            second = mirror.pid
        finally:
            mirror.stop()
        assert not _running(first) and not _running(second)
        ml_id = client.get(f"/api/v1/runs/{run_id}").json()["mlflow_run_id"]
    engine.dispose()
    assert [m.step for m in _mlflow(mlflow_url).get_metric_history(ml_id, "loss")] == list(range(9))


def test_mirror_process_ends_when_the_collector_is_killed(tmp_path, mlflow_url):
    db = f"sqlite:///{tmp_path}/lw.db"
    migrations.upgrade(db)
    code = (
        "import time\n"
        "from layerwatch_server.mirrors.mlflow_mirror import MirrorConfig\n"
        "from layerwatch_server.mirrors.process import MirrorJob, MirrorProcess\n"
        f"p = MirrorProcess(MirrorJob(MirrorConfig({mlflow_url!r}), {db!r}, 0.5))\n"
        "p.start()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _running(child)
    finally:
        parent.kill()  # no chance to stop its child
        parent.wait()
    wait_until(lambda: not _running(child), 30, "the orphaned mirror process to exit")


def test_a_run_faster_than_the_budget_is_sent_downsampled_and_the_mirror_keeps_pace(collector, mlflow_url):
    client, engine = collector
    # 4 layers x 2 statistics, 4 parameters x 1, 8 run-level figures, 2 user scalars: 22 metrics a step;
    # 64 steps in one tick are 1,408 metrics, past a budget of 200: every 8th step, 9 at most
    mirror = MlflowMirror(MirrorConfig(tracking_uri=mlflow_url, max_metrics_per_tick=200))
    healthy = {(s, i, "nonfinite"): 0.0 for s in range(80) for i in range(4)}
    nan_at_5 = {**healthy, (5, 2, "nonfinite"): 3.0}  # 3 NaN/Inf activations counted by the client at step 5
    key = unique("run")
    run_id = post(client, _healthy_grads(make_batch(key, steps=range(64), overrides=nan_at_5))).json()["run_id"]
    run = source.pending_runs(engine, 1, run_id)[0]
    mirror.sync_run(engine, run, time.time())
    assert run.cursor == 63 and mirror.metrics_total <= 200  # kept pace with all 64 steps in one tick
    ml = _mlflow(mlflow_url)
    ml_id = run.mlflow_run_id

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in ml.get_metric_history(ml_id, key))

    grid = list(range(0, 64, 8))
    assert steps("loss") == grid and steps("linear/blocks.0.fc/act_std") == grid
    assert steps("param/blocks.3.fc.weight/grad_norm") == grid
    assert steps("linear/blocks.1.fc/dead_frac") == grid  # sparse: its first measurement of each window
    assert steps("layerwatch/nonfinite_count") == sorted([*grid, 5])  # a non-finite count goes out at any step
    # a tick that fits the budget sends every step again
    post(client, _healthy_grads(make_batch(key, steps=range(64, 72), overrides=healthy)))
    mirror.sync_run(engine, source.pending_runs(engine, 1, run_id)[0], time.time())
    assert steps("loss") == [*grid, *range(64, 72)]


def _healthy_grads(batch: dict) -> dict:
    """No non-finite gradients counted (the test batches' every statistic is some large number)."""
    at = 1 + wire.PARAM_STATS.index("grad_nonfinite")
    for step in batch["steps"]:
        step["params"] = [[*row[:at], 0.0, *row[at + 1 :]] for row in step["params"]]
    return batch


def test_backfill_command(collector, mlflow_url):
    from click.testing import CliRunner

    from layerwatch_server.cli import main

    client, engine = collector
    run_id = post(client, make_batch(unique("run"), steps=range(4), end="finished")).json()["run_id"]
    target = mlflow_url
    db = str(engine.url)
    result = CliRunner().invoke(main, ["backfill-mlflow", run_id, "--db", db, "--mlflow-tracking-uri", target])
    assert result.exit_code == 0, result.output
    ml_id = source.pending_runs(engine, 1, run_id)[0].mlflow_run_id
    assert _mlflow(target).get_run(ml_id).info.status == "FINISHED"


def test_mirror_command_runs_alone_and_stops_on_sigterm(collector, mlflow_url, tmp_path):
    """``layerwatch-server mirror``: the mirror as a Deployment of its own (no collector in its process)."""
    client, engine = collector
    run_id = post(client, make_batch(unique("run"), steps=range(3), end="finished")).json()["run_id"]
    env = {**os.environ, "LAYERWATCH_MLFLOW_INTERVAL_S": "0.5"}
    cmd = [sys.executable, "-m", "layerwatch_server.cli", "mirror", "--db", str(engine.url)]
    with open(tmp_path / "mirror.log", "wb") as log:
        proc = subprocess.Popen([*cmd, "--mlflow-tracking-uri", mlflow_url], env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: source.pending_runs(engine, 1, run_id)[0].cursor == 2, 60, "the command to mirror the run")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0, (tmp_path / "mirror.log").read_text()
    ml_id = source.pending_runs(engine, 1, run_id)[0].mlflow_run_id
    assert _mlflow(mlflow_url).get_run(ml_id).info.status == "FINISHED"
