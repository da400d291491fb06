"""Scheduled jobs: once per tick across replicas (lease rows), and retention rollups that keep extremes."""

from __future__ import annotations

import math
import threading

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.jobs.retention import roll_up
from layerwatch_server.storage.models import Rollup, layer_stats, step_stats
from layerwatch_server.storage.ticks import run_once

from .batches import make_batch, post, unique


def test_a_tick_runs_once_across_replicas(engine):
    calls: list[str] = []
    barrier = threading.Barrier(4)

    def replica(name: str) -> None:
        barrier.wait()
        run_once(engine, "t-" + str(id(engine)), 60, lambda e, now: calls.append(name), replica=name, now=6000.0)

    threads = [threading.Thread(target=replica, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert run_once(engine, "t-" + str(id(engine)), 60, lambda e, now: calls.append("next"), replica="x", now=6060.0)
    assert calls[-1] == "next"


def test_retention_rolls_up_old_steps_and_series_shows_them(engine, db_url):
    app = create_app(Settings(db_url=db_url, no_auth=True, scheduler=False), engine)
    project = unique()
    with TestClient(app) as client:
        overrides = {(57, 0, "act_max_abs"): 1e6, (58, 0, "act_mean"): math.nan}
        run_id = post(
            client, make_batch("old", steps=range(250), n_layers=2, project=project, overrides=overrides)
        ).json()["run_id"]
        with engine.connect() as conn:
            before = conn.scalar(select(func.count()).select_from(layer_stats).where(layer_stats.c.run_id == run_id))
        removed = roll_up(engine, cutoff=math.inf, bucket=100)  # everything is "old"
        assert removed >= 200
        with engine.connect() as conn:
            raw_steps = conn.scalars(select(step_stats.c.step).where(step_stats.c.run_id == run_id)).all()
            after = conn.scalar(select(func.count()).select_from(layer_stats).where(layer_stats.c.run_id == run_id))
            n_rollups = conn.scalar(select(func.count()).select_from(Rollup).where(Rollup.run_id == run_id))
        assert sorted(raw_steps) == list(range(200, 250))  # only whole buckets are rolled up
        assert after == before - 200 * 2 and n_rollups > 0
        pts = client.get(
            f"/api/v1/runs/{run_id}/series", params={"layer": "blocks.0.fc", "stat": "act_max_abs"}
        ).json()["points"]
        assert pts[0]["step"] == 0 and pts[0]["max"] == 1e6 and pts[1]["step"] == 100
        assert [p["step"] for p in pts[2:]] == list(range(200, 250))
        mean = client.get(f"/api/v1/runs/{run_id}/series", params={"layer": "blocks.0.fc", "stat": "act_mean"}).json()[
            "points"
        ]
        assert mean[0]["max"] != "NaN" and isinstance(mean[0]["value"], float)  # NaN counted, not averaged in
        with engine.connect() as conn:
            nan_count = conn.scalar(
                select(func.sum(Rollup.nan_count)).where(
                    Rollup.run_id == run_id,
                    Rollup.stat == "act_mean",
                    Rollup.bucket_start == 0,
                    Rollup.series == "layer",
                    Rollup.rank == 0,
                )
            )
        assert nan_count == 1  # the one NaN act_mean of the first bucket, over both layers
        assert roll_up(engine, cutoff=math.inf, bucket=100) == 0  # idempotent


def test_retention_deletes_old_histograms_and_edges_no_histogram_uses(engine, db_url):
    from layerwatch_server.storage.histograms import edges_id
    from layerwatch_server.storage.models import histogram_edges, histograms

    from .test_histograms import entry, with_histograms

    app = create_app(Settings(db_url=db_url, no_auth=True, scheduler=False), engine)
    kept_edges, gone_edges = [-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0]
    with TestClient(app) as client:
        steps = range(0, 250, 10)
        body = make_batch(unique("k"), steps=range(250), n_layers=2, project=unique())
        long_run = post(client, with_histograms(body, [entry("blocks.0.fc", s, [1, 2, 3, 4]) for s in steps]))
        body = make_batch(unique("k"), steps=range(100), n_layers=2, project=unique())
        short_run = post(client, with_histograms(body, [entry("blocks.0.fc", 50, [4, 3, 2, 1])], gone_edges))
        assert roll_up(engine, cutoff=math.inf, bucket=100) > 0
        with engine.connect() as conn:
            left = conn.execute(select(histograms.c.run_id, histograms.c.step)).all()
            edges = set(conn.scalars(select(histogram_edges.c.id)))
    assert sorted(left) == [(long_run.json()["run_id"], s) for s in range(200, 250, 10)]  # whole buckets only
    assert short_run.json()["run_id"] not in {run for run, _ in left}
    assert edges_id(kept_edges) in edges and edges_id(gone_edges) not in edges
