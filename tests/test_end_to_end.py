"""The whole path for real: the client in a training loop -> a real collector process -> its database -> the
query API, on SQLite and on PostgreSQL, across a collector restart mid-run."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from torch import nn

import layerwatch
import layerwatch.cli as cli_module
from layerwatch import terminal_map
from layerwatch.cli import main as cli
from layerwatch_server.storage import tokens
from layerwatch_server.storage.engine import make_engine
from tests.service.dbs import fresh_pg_database
from tests.service.server import free_port, running_server
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'e2e.db'}"
        subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", url], check=True)
        yield url
    else:
        with fresh_pg_database() as url:
            subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", url], check=True)
            yield url


def train(mon, model, steps: range) -> None:
    for _ in steps:
        x = torch.randn(16, 8)
        x[:, :4] = -1.0 - x[:, :4].abs()  # the first layer's units 0-3 see only negative inputs: dead
        loss = model(x).pow(2).mean()
        loss.backward()
        mon.step(loss=loss, lr=0.01)
        model.zero_grad()


def test_training_run_survives_a_collector_restart_and_lands_exactly_once(db_url, tmp_path):
    port = free_port()
    model = nn.Sequential(nn.ReLU(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with running_server(db_url, log_path=tmp_path / "a.log", args=("--no-auth",), port=port) as (base, _):
        mon = layerwatch.watch(
            model,
            run_name="e2e",
            project="e2e",
            url=base,
            every=5,
            timeout=2,
            max_backoff=0.5,
            rules={"dead_units": {"threshold": 0.4}},  # the half-dead first ReLU fires; `show` lists it
        )
        train(mon, model, range(0, 30))
        wait_until(lambda: mon.stats["delivered_batches"] >= 6, 20, lambda: f"6 batches delivered: {mon.stats}")
    train(mon, model, range(30, 60))  # collector down: batches spool to disk
    with running_server(db_url, log_path=tmp_path / "b.log", args=("--no-auth",), port=port) as (base, _):
        train(mon, model, range(60, 80))
        mon.close()
        assert mon.stats["spooled_bytes"] == 0
        with httpx.Client(base_url=base) as http:
            runs = http.get("/api/v1/runs", params={"project": "e2e"}).json()
            assert [(r["name"], r["status"]) for r in runs] == [("e2e", "finished")]
            assert (runs[0]["firing_alerts"], runs[0]["pending_alerts"]) == (1, 0)
            run_id = runs[0]["id"]
            loss = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}).json()["points"]
            assert [p["step"] for p in loss] == list(range(80))  # every step, once, in order
            dead = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "dead_frac", "layer": "0"}).json()
            assert [p["value"] for p in dead["points"]] == [0.5] * 16  # one value per 5-step window
            detail = http.get(f"/api/v1/runs/{run_id}").json()
            assert [layer["name"] for layer in detail["layers"]] == ["0", "1", "2", "3"]
            latest = http.get(f"/api/v1/runs/{run_id}/latest").json()
            assert latest["layers"][0]["dead_frac"] == 0.5 and latest["layers"][0]["step"] == 79
            # the ReLUs' dead_frac means dead units; the output head's does not
            assert [layer["dead_judged"] for layer in latest["layers"]] == [True, False, True, False]
        # The CLI for people reads the same API.
        runner = CliRunner()
        listed = runner.invoke(cli, ["runs", "--url", base])
        assert listed.exit_code == 0 and "e2e" in listed.output and "finished" in listed.output
        assert "1 firing" in listed.output  # the dead_units alert below
        shown = runner.invoke(cli, ["show", run_id, "--url", base])
        assert shown.exit_code == 0 and "ReLU" in shown.output
        assert "Ranks" in shown.output and "every=5" in shown.output
        open_alert = next(line for line in shown.output.splitlines() if line.startswith("│ dead_units"))
        assert "│ firing │" in open_alert and "layer 0: 50%" in open_alert
        tailed = runner.invoke(cli, ["tail", run_id, "--url", base, "--once"])
        assert tailed.exit_code == 0, tailed.output
        first_row = next(line for line in tailed.output.splitlines() if "ReLU" in line)
        assert "0.5" in first_row  # the half-dead ReLU layer is on top
        assert "Open alerts" in tailed.output and "│ dead_units" in tailed.output
        mapped = runner.invoke(cli, ["show", run_id, "--url", base, "--map"])
        assert mapped.exit_code == 0, mapped.output
        rows = {line.split()[0]: line for line in mapped.output.splitlines()[2:6]}
        assert list(rows) == ["0", "1", "2", "3"]  # model order, one row per layer
        assert terminal_map.ONSET in rows["0"] and terminal_map.ONSET not in rows["2"]  # where dead_units began


@pytest.fixture
def collector_with_tokens(tmp_path):
    """A collector with tokens on (as `layerwatch-server serve` runs by default), a run of an MLP sent with a
    write token, and a read token."""
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", url], check=True)
    engine = make_engine(url)
    write, read = (tokens.create_token(engine, "a-rather-long-project-name", scope) for scope in ("write", "read"))
    engine.dispose()
    with running_server(url, log_path=tmp_path / "server.log") as (base, _):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        mon = layerwatch.watch(
            model, run_name="resnet50-lr0.4-warmup-cosine", project="a-rather-long-project-name", url=base,
            token=write, every=5,
        )  # fmt: skip
        train(mon, model, range(30))
        mon.close()
        yield base, write, read


def test_the_cli_names_runs_as_people_paste_them(collector_with_tokens, monkeypatch):
    """In 80 columns the id is listed whole; show and tail take a unique start of it, with or without the
    ellipsis a narrower table would have added; a job's write token is told it cannot read, not shown nothing."""
    base, write, read = collector_with_tokens
    monkeypatch.setattr(cli_module, "out", Console(width=80))
    runner = CliRunner()
    refused = runner.invoke(cli, ["runs", "--url", base, "--token", write])
    assert refused.exit_code == 1 and "403" in refused.output and "read or admin token" in refused.output
    listed = runner.invoke(cli, ["runs", "--url", base, "--token", read])
    assert listed.exit_code == 0, listed.output
    run_id = httpx.get(f"{base}/api/v1/runs", headers={"Authorization": f"Bearer {read}"}).json()[0]["id"]
    assert f"│ {run_id} │" in listed.output and max(map(len, listed.output.splitlines())) <= 80
    for ref in (run_id[:5], run_id[:7] + "…", run_id[:7] + "...", run_id):
        shown = runner.invoke(cli, ["show", ref, "--url", base, "--token", read])
        assert shown.exit_code == 0 and f"({run_id})" in shown.output, (ref, shown.output)
    # Linear layers listed as what they are, the head with the reading of its dead_frac
    kinds = [line.split("│")[3].strip() for line in shown.output.splitlines() if line.startswith("│ ") and "[" in line]
    assert kinds == ["linear", "relu", "output"]
    assert "output: the model's output head" in shown.output
    unknown = runner.invoke(cli, ["show", "zzzz…", "--url", base, "--token", read])
    assert unknown.exit_code == 1 and "404" in unknown.output and "zzzz" in unknown.output
    assert "Traceback" not in unknown.output
    tailed = runner.invoke(cli, ["tail", run_id[:6], "--url", base, "--token", read, "--once"])
    assert tailed.exit_code == 0, tailed.output


def test_a_linear_before_its_relu_has_no_zero_frac_at_any_step(collector_with_tokens):
    """docs/reference.md: its units are measured by the ReLU, its zero_frac is null: on the first step too, so
    /latest and `layerwatch tail` do not show a 0 that turns into nothing once the first step is old."""
    base, _, read = collector_with_tokens
    auth = {"Authorization": f"Bearer {read}"}
    run_id = httpx.get(f"{base}/api/v1/runs", headers=auth).json()[0]["id"]
    series = httpx.get(f"{base}/api/v1/runs/{run_id}/series", params={"stat": "zero_frac", "layer": "0"}, headers=auth)
    assert series.json()["points"] == []
    latest = {
        layer["name"]: layer
        for layer in httpx.get(f"{base}/api/v1/runs/{run_id}/latest", headers=auth).json()["layers"]
    }
    assert "zero_frac" not in latest["0"] and 0 <= latest["1"]["zero_frac"] <= 1  # the ReLU has its own
