"""The first NaN against a real collector: the early report raises `non_finite` mid-interval, the collector's alert
comes back deduplicated against the client's own, and the run goes on with every step once; under DDP with the
ranks' reports combined, the rank that saw it sends a preview of its own, and the combined report still pairs up."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import layerwatch
from layerwatch.alerts import Alert
from tests.client.test_ddp import _free_port
from tests.service.server import running_server
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow]


def test_a_nan_at_step_3_of_10_reaches_a_real_collector_before_step_5(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'nan.db'}"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db_url], check=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    heard: list[tuple[int, Alert]] = []
    current = -1

    def train(mon: layerwatch.Monitor, steps: range) -> None:
        nonlocal current
        for current in steps:
            if current == 3:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
            model(torch.randn(16, 8)).pow(2).mean().backward()
            mon.step(loss=model(torch.randn(4, 8)).mean().detach(), lr=0.01)
            model.zero_grad()

    with running_server(db_url, log_path=tmp_path / "server.log", args=("--no-auth",)) as (base, _):
        mon = layerwatch.watch(
            model, run_name="nan", project="nan", url=base, every=10, on_alert=lambda a: heard.append((current, a))
        )
        train(mon, range(5))
        assert [(step, a.rule, a.source) for step, a in heard] == [(3, "non_finite", "local")]
        # The loop stands at step 4, far from step 9's report: the collector must raise it from the early batch.
        with httpx.Client(base_url=base) as http:
            alerts = wait_until(
                lambda: http.get("/api/v1/alerts", params={"project": "nan", "state": "firing"}).json(), 30
            )
            assert [(a["rule"], a["step"]) for a in alerts] == [("non_finite", 3)]
            assert "first at step 3 (forward, layer 2)" in alerts[0]["message"]
            run_id = alerts[0]["run_id"]
            # the ingest answer brings it back; it replaces the local one
            wait_until(lambda: [a.source for a in mon.alerts] == ["collector"], 30, lambda: mon.alerts)
            assert [(a.rule, a.id, a.source) for a in mon.alerts] == [("non_finite", alerts[0]["id"], "collector")]
            train(mon, range(5, 25))
            mon.close()
            assert len(heard) == 1  # one incident, one call: the collector's alert was deduplicated
            loss = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}).json()["points"]
            assert [p["step"] for p in loss] == list(range(25))  # the early batch and the ones after it, once each
            run = http.get(f"/api/v1/runs/{run_id}").json()
            assert run["status"] == "finished"


@contextmanager
def _ended(job: Any) -> Iterator[None]:
    """A job whose test failed is not left running (rank 0 would wait in an all-reduce for half an hour)."""
    try:
        yield
    finally:
        for process in job.processes:
            if process.is_alive():
                process.terminate()


def _ddp_worker(rank: int, world: int, port: int, base: str, alerted: Any) -> None:
    """10 steps of one report interval; rank 1 alone gets a NaN input at step 3, then waits at step 5 (holding
    rank 0 in DDP's all-reduce) until the collector has raised the alert, long before the interval's report."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon = layerwatch.watch(model, project="ddp-nan", run_name="ddp-nan", url=base, every=10)  # combined ranks
        for step in range(10):
            if rank == 1 and step == 5 and not alerted.wait(60):
                raise AssertionError("the collector raised no non_finite alert from rank 1's preview")
            x = torch.randn(16, 8)
            if rank == 1 and step == 3:
                x[0, 0] = math.nan
            loss = model(x).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
        mon.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_under_ddp_a_nan_on_rank_1_reaches_the_collector_mid_interval_and_the_combined_report_follows(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'ddp.db'}"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db_url], check=True)
    with running_server(db_url, log_path=tmp_path / "server.log", args=("--no-auth",)) as (base, _):
        alerted = mp.get_context("spawn").Event()
        job = mp.spawn(_ddp_worker, args=(2, _free_port(), base, alerted), nprocs=2, join=False)
        with httpx.Client(base_url=base) as http, _ended(job):

            def raised() -> list[dict[str, Any]]:
                firing = http.get("/api/v1/alerts", params={"project": "ddp-nan", "state": "firing"}).json()
                return [a for a in firing if a["rule"] == "non_finite" and "on rank 1" in a["message"]]

            # Rank 1 stands at step 5 (and rank 0 with it): the alert can only come from a preview.
            (alert,) = wait_until(raised, 60, lambda: http.get("/api/v1/alerts").json())
            assert alert["step"] == 3 and "first at step 3 (forward, layer 0) on rank 1" in alert["message"]
            run_id = alert["run_id"]
            assert http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}).json()["points"] == []
            alerted.set()
            deadline = time.monotonic() + 120
            while not job.join(timeout=1):
                assert time.monotonic() < deadline, "a rank hung"
            # The interval's report was combined across the ranks and stored once, by rank 0; the previews were not.
            loss = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}).json()["points"]
            assert [p["step"] for p in loss] == list(range(10))
            act = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "act_mean", "layer": "0"}).json()
            assert [p["step"] for p in act["points"]] == list(range(10))
            rank1 = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss", "rank": 1}).json()
            assert rank1["points"] == []
            run = http.get(f"/api/v1/runs/{run_id}").json()
            assert run["status"] == "finished"
            assert run["nonfinite_origin"] == {"step": 3, "pass": "forward", "layer": "0", "rank": 1}
