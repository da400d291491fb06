"""Scenario fixtures: one real collector process (SQLite, no auth) per module, and a training helper."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
import yaml

import layerwatch
from tests.scenarios.suite import Pager
from tests.service.server import running_server


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """These models are tiny: a second torch thread only fights the collector for the CPU (25x slower on a
    loaded 2-core machine). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pager() -> Iterator[Pager]:
    """The collector's only notification channel: a webhook receiver in this process (a notification is a page)."""
    p = Pager()
    yield p
    p.server.shutdown()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory, pager: Pager) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("scenario")
    db = f"sqlite:///{tmp}/lw.db"
    subprocess.run([sys.executable, "-m", "layerwatch_server.cli", "migrate", "--db", db], check=True)
    rules = tmp / "rules.yaml"
    rules.write_text(yaml.safe_dump({"channels": {"pager": {"type": "webhook", "url": pager.url}}}))
    # Alerts are what these tests judge: no MLflow mirror (its in-process store would share the CPU).
    env = {"LAYERWATCH_MLFLOW_TRACKING_URI": "off", "LAYERWATCH_RULES_FILE": str(rules)}
    with running_server(db, log_path=tmp / "server.log", args=("--no-auth",), env=env) as (base, _):
        yield base


Step = Callable[[int], torch.Tensor]  # step -> loss (after backward), the optimizer step is the caller's


def train(
    url: str,
    model: torch.nn.Module,
    step: Callable[[int], Any],
    steps: int,
    name: str,
    **watch: Any,
) -> tuple[list[dict[str, Any]], layerwatch.Monitor]:
    """Run ``step(i)`` (which returns the loss to report, or None to stop) under layerwatch; the run's alerts."""
    watch.setdefault("every", 5)
    watch.setdefault("flush_timeout", 60)  # a loaded CI machine: wait for every batch rather than spool it
    with layerwatch.watch(model, run_name=name, project="scenarios", url=url, **watch) as mon:
        for i in range(steps):
            loss = step(i)
            if loss is None:
                break
            mon.step(loss=loss)
    assert mon.run_id, "the collector never answered"
    assert mon.stats["spooled_bytes"] == 0, f"batches left undelivered: {mon.stats}"
    alerts = httpx.get(f"{url}/api/v1/alerts", params={"run_id": mon.run_id}).json()
    return alerts, mon


def sgd_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[int], torch.Tensor]) -> Step:
    def step(i: int) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(i)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def rules(alerts: list[dict[str, Any]], state: str | None = "firing") -> set[str]:
    return {a["rule"] for a in alerts if state is None or a["state"] == state or a["fired_at"]}
