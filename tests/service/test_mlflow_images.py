"""The mirror's pictures on a real ``mlflow server``: the health map and the worst layers' distributions, as
images with a step, at a bounded rate and at the run's end, read back through MlflowClient."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.mirrors.mlflow_mirror import MirrorConfig, MlflowMirror
from layerwatch_server.storage import migrations
from layerwatch_server.storage.engine import make_engine

from .batches import make_batch, post, unique
from .mlflow_server import running_mlflow
from .test_histograms import entry, with_histograms

pytestmark = pytest.mark.slow

N_LAYERS = 4
# layer -> dead_frac: 1 is the most dead, then 2. Layer 0's parameter gradient is 0 at step 0 (``value``), so
# vanishing_gradients fires on it: an alerted layer comes before any dead_frac.
DEAD = {0: 0.0, 1: 0.9, 2: 0.4, 3: 0.1}


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory):
    with running_mlflow(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory):
    url = f"sqlite:///{tmp_path_factory.mktemp('lw')}/lw.db"
    migrations.upgrade(url)
    engine = make_engine(url)
    settings = Settings(db_url=url, scheduler=False, no_auth=True, mlflow_tracking_uri="off")
    with TestClient(create_app(settings, engine)) as client:
        yield client, engine
    engine.dispose()


def batch(key: str, steps: range, end: str | None = None) -> dict:
    overrides = {(s, i, stat): (dead if stat == "dead_frac" else 0.0) for s in steps
                 for i, dead in DEAD.items() for stat in ("dead_frac", "sat_frac")}  # fmt: skip
    hists = [entry(f"blocks.{i}.fc", s, [s, 1, 2, 3], kind) for s in steps for i in range(N_LAYERS)
             for kind in ("activation", "gradient")]  # fmt: skip
    body = make_batch(key, steps=steps, n_layers=N_LAYERS, overrides=overrides, end=end)
    return with_histograms(body, hists)


def images(ml, run_id: str) -> dict[str, set[int]]:
    """Image key (as MLflow names its files) -> the steps logged under it (full-size PNGs)."""
    out: dict[str, set[int]] = {}
    for item in ml.list_artifacts(run_id, "images"):
        found = re.fullmatch(r"images/(.+)\+step\+(\d+)\+timestamp\+\d+\+[-0-9a-f]+\.png", item.path)
        if found:
            out.setdefault(found[1], set()).add(int(found[2]))
    return out


def test_pictures_are_logged_as_images_at_a_bounded_rate_and_at_the_end(collector, mlflow_url, tmp_path: Path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client, engine = collector
    mirror = MlflowMirror(MirrorConfig(tracking_uri=mlflow_url, image_interval_s=600.0, image_layers=2))
    key = unique("run")
    run_id = post(client, batch(key, range(0, 10))).json()["run_id"]
    mirror.tick(engine, now=1000.0)  # the run's first tick: metrics only, its first pictures one interval on
    post(client, batch(key, range(10, 12)))
    mirror.tick(engine, now=1001.0)  # new steps, but within the interval: metrics only
    post(client, batch(key, range(12, 15)))
    mirror.tick(engine, now=1600.0)  # new steps an interval after the first tick: pictures at the cursor
    post(client, batch(key, range(15, 20), end="finished"))
    mirror.tick(engine, now=1601.0)  # the run ended: its last pictures
    assert mirror.errors_total == 0

    ml = MlflowClient(tracking_uri=mlflow_url)
    ml_id = client.get(f"/api/v1/runs/{run_id}").json()["mlflow_run_id"]
    assert [m.step for m in ml.get_metric_history(ml_id, "loss")] == list(range(20))
    logged = images(ml, ml_id)
    assert logged.pop("layerwatch~health_map") == {14, 19}
    # the two worst layers at each set: alerted ones first, then by dead_frac (later alerts change the pick)
    by_step = {step: {k.rpartition("~")[2] for k, steps in logged.items() if step in steps} for step in (14, 19)}
    assert set().union(*logged.values()) == {14, 19} and all(len(names) == 2 for names in by_step.values()), logged
    assert "blocks.1.fc" in by_step[14] & by_step[19] and "blocks.3.fc" not in by_step[14] | by_step[19], logged
    for kind in ("activation", "gradient"):
        assert logged[f"layerwatch~distribution~{kind}~blocks.1.fc"] == {14, 19}
    assert ml.get_run(ml_id).data.tags["mlflow.loggedImages"] == "True"

    files = [p.path for p in ml.list_artifacts(ml_id, "images")]
    name = next(p for p in files if "health_map+step+19" in p and p.endswith(".png"))
    png = Path(ml.download_artifacts(ml_id, name, tmp_path)).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.width > 800 and picture.height > 200

    mirror.tick(engine, now=5000.0)  # ended and pictured: nothing more, however late
    assert images(ml, ml_id) == {**logged, "layerwatch~health_map": {14, 19}}


def test_a_picture_that_fails_never_holds_back_the_metrics(collector, mlflow_url, monkeypatch):
    from mlflow.tracking import MlflowClient

    from layerwatch_server.mirrors import images as mirror_images

    def broken(*args, **kwargs):
        raise RuntimeError("no pictures today")

    client, engine = collector
    monkeypatch.setattr(mirror_images.pictures, "render_health_map", broken)
    mirror = MlflowMirror(MirrorConfig(tracking_uri=mlflow_url))
    run_id = post(client, batch(unique("run"), range(0, 5), end="finished")).json()["run_id"]
    mirror.tick(engine)  # the run ended: its pictures are due, and fail
    assert mirror.errors_total == 1
    ml_id = client.get(f"/api/v1/runs/{run_id}").json()["mlflow_run_id"]
    assert [m.step for m in MlflowClient(tracking_uri=mlflow_url).get_metric_history(ml_id, "loss")] == list(range(5))
