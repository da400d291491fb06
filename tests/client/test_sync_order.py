"""`layerwatch sync --in-flight N` of a real offline run into a real collector: every step stored once, and judged
by the rules in the order it was trained, whatever order its batches arrived in."""

from __future__ import annotations

import httpx
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select
from torch import nn

import layerwatch
from layerwatch.cli import main as cli
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.migrations import upgrade
from layerwatch_server.storage.models import RuleState, step_stats
from tests.service.server import running_server

pytestmark = [pytest.mark.slow]

STEPS, EVERY, SPIKE = 200, 5, 150


def offline_run(spool_dir: str) -> None:
    """A small MLP trained on noise, one loss reported 100x too high at SPIKE."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = layerwatch.watch(
        model, run_name="in-flight", project="sync-order", mode="offline", spool_dir=spool_dir, every=EVERY
    )
    for i in range(STEPS):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss=loss * 100 if i == SPIKE else loss)
    mon.close()


def test_a_sync_with_batches_in_flight_stores_every_step_and_judges_them_in_order(tmp_path):
    offline_run(str(tmp_path / "spool"))
    url = f"sqlite:///{tmp_path / 'collector.db'}"
    upgrade(url)
    log = tmp_path / "collector.log"
    with running_server(url, log_path=log, args=("--no-auth",)) as (base, _):
        result = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", base, "--in-flight", "4"])
        assert result.exit_code == 0, result.output
        assert f"Uploaded {STEPS // EVERY + 1} batch(es)" in result.output  # and the run's end
        with httpx.Client(base_url=base) as http:
            (run,) = http.get("/api/v1/runs", params={"project": "sync-order"}).json()
            alerts = http.get("/api/v1/alerts", params={"run_id": run["id"]}).json()
    assert "did not come within" not in log.read_text()  # no batch went on without the one before it
    spikes = [a for a in alerts if a["rule"] == "loss_spike"]
    assert [a["step"] for a in spikes] == [SPIKE] and spikes[0]["fired_at"] is not None

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            losses = conn.execute(
                select(step_stats.c.step, step_stats.c.loss).where(step_stats.c.run_id == run["id"]).order_by("step")
            ).all()
            memory = conn.scalar(select(RuleState.data).where(RuleState.run_id == run["id"]))
    finally:
        engine.dispose()
    assert [s for s, _ in losses] == list(range(STEPS))  # every step, once
    assert memory["last_step"] == STEPS - 1
    # The loss rule's history is the last 100 losses in training order: no batch was judged out of turn, or skipped
    assert memory["loss_spike"] == [float(f"{loss:.6g}") for _, loss in losses[-100:]]
