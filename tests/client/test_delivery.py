"""Delivery against a real HTTP server that goes down, gets slow or busy, and comes back."""

from __future__ import annotations

import logging

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import layerwatch
from layerwatch.cli import main as cli
from tests.client.fake_collector import FakeCollector
from tests.waiting import wait_until as wait_for


def train(mon, model, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        model(torch.randn(4, 4)).sum().backward()
        mon.step(loss=torch.tensor(float(step)))
        model.zero_grad()


def expected(mon, steps: int) -> set[tuple[str, int, int]]:
    return {(mon.run_key, 0, s) for s in range(steps)}


def test_healthy_collector_gets_every_step_once(collector):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(model, url=collector.url, every=5)
    train(mon, model, 23)
    mon.close()
    assert collector.steps() == expected(mon, 23)
    assert set(collector.received.values()) == {1}
    assert collector.batches[-1]["end"] == {"status": "finished"}
    assert mon.stats["spooled_bytes"] == 0 and mon.stats["dropped_reports"] == 0


def test_collector_down_then_busy_then_slow_then_back(tmp_path):
    server = FakeCollector()
    port = server.port
    server.stop()  # down: connection refused
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(
        model, url=f"http://127.0.0.1:{port}", every=2, timeout=0.5, max_queued_batches=2, max_backoff=0.5
    )
    train(mon, model, 20)
    assert wait_for(lambda: mon.stats["spooled_bytes"] > 0)  # batches went to disk, not to unbounded memory

    server = FakeCollector(port)
    server.mode = "busy"  # 503 + Retry-After
    train(mon, model, 10, start=20)
    assert wait_for(lambda: server.requests > 3)
    server.slow_seconds, server.mode = 1.0, "slow"  # answers after the client gave up: it retries
    train(mon, model, 10, start=30)
    assert wait_for(lambda: len(server.batches) >= 2)
    server.mode = "ok"
    train(mon, model, 10, start=40)
    mon.close()
    try:
        assert server.steps() == expected(mon, 50)  # every step arrived; re-sends are (run, rank, step) no-ops
        # Spool first, oldest first, one batch at a time: batches first arrive in the order they were made
        # (a re-sent batch arrives again later, with its old seq).
        first_seen = list(dict.fromkeys(b["seq"] for b in server.batches))
        assert first_seen == sorted(first_seen)
        assert mon.stats["spooled_bytes"] == 0
    finally:
        server.stop()


def test_a_refused_token_spools_everything_for_a_later_sync(collector, tmp_path, caplog):
    collector.mode = "unauthorized"
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with caplog.at_level(logging.ERROR, logger="layerwatch"):
        mon = layerwatch.watch(model, url=collector.url, token="wrong", every=2)
        train(mon, model, 10)
        mon.close()
    assert "refused the token" in caplog.text
    assert caplog.text.count("refused the token") == 1  # reported once, clearly
    assert collector.steps() == set()
    collector.mode = "ok"
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url])
    assert result.exit_code == 0, result.output
    assert collector.steps() == expected(mon, 10)
    again = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url])
    assert again.exit_code == 0 and "No spooled batches" in again.output  # delivered segments are gone


def test_offline_run_then_sync(collector, tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(model, every=3)  # no url: offline
    train(mon, model, 11)
    mon.close()
    assert collector.requests == 0
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url])
    assert result.exit_code == 0, result.output
    assert collector.steps() == expected(mon, 11)
    assert collector.batches[-1]["end"] == {"status": "finished"}


def test_a_rejected_batch_is_kept_aside_and_counted(collector, tmp_path):
    collector.mode = "reject"
    model = nn.Sequential(nn.Linear(4, 4))
    mon = layerwatch.watch(model, url=collector.url, every=2)
    train(mon, model, 4)
    assert wait_for(lambda: mon.stats["rejected_batches"] >= 1)
    mon.close()
    assert list((mon.spool_dir / "rejected").glob("*.lws"))
    assert mon.stats["rejected_batches"] == 3 and mon.stats["dropped_reports"] == 0  # refused, not dropped


def test_a_poison_batch_does_not_block_the_batches_behind_it(collector, tmp_path):
    collector.poison = lambda batch: batch["seq"] == 1  # e.g. a config the database cannot store
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(model, url=collector.url, every=2)
    train(mon, model, 20)
    mon.close()
    assert collector.refused == 1 and mon.stats["rejected_batches"] == 1
    assert collector.steps() == expected(mon, 20) - {(mon.run_key, 0, 2), (mon.run_key, 0, 3)}
    assert collector.batches[-1]["dropped"]["rejected"] == 1  # the count reaches the collector

    listed = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url])
    assert listed.exit_code == 1  # something was not delivered
    assert "1 batch(es) set aside" in listed.output and "nested too deep" in listed.output
    again = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url, "--rejected"])
    assert again.exit_code == 1 and "1 batch(es) set aside" in again.output  # still refused: still kept
    collector.poison = None  # the collector was fixed
    fixed = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url, "--rejected"])
    assert fixed.exit_code == 0, fixed.output
    assert collector.steps() == expected(mon, 20)


@pytest.mark.parametrize("status", [500, 404])
def test_a_collector_failing_forever_leaves_everything_to_sync(collector, tmp_path, status):
    """500: retried until close(), then spooled; 404 (a wrong URL): kept at once. Nothing is set aside."""
    collector.mode, collector.status = "status", status
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(model, url=collector.url, every=2, max_backoff=0.1, flush_timeout=0.5)
    train(mon, model, 10)
    mon.close()
    assert not (mon.spool_dir / "rejected").exists()
    assert mon.stats["rejected_batches"] == 0 and mon.stats["spooled_bytes"] > 0
    failed = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url, "--retries", "1"])
    assert failed.exit_code == 1 and f"HTTP {status}" in failed.output
    assert "No spooled batches" not in failed.output
    collector.mode = "ok"
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "spool"), "--url", collector.url])
    assert result.exit_code == 0, result.output
    assert collector.steps() == expected(mon, 10)


def test_force_flush_delivers_what_was_reported_and_says_so(collector, tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    mon = layerwatch.watch(model, url=collector.url, every=5)
    train(mon, model, 10)
    assert mon.force_flush(10)  # both reports delivered before close()
    assert collector.steps() == expected(mon, 10)
    collector.mode = "status"  # 500 from now on: retried, not delivered
    train(mon, model, 5, start=10)
    assert not mon.force_flush(0.5)
    collector.mode = "ok"
    assert mon.force_flush(10) and collector.steps() == expected(mon, 15)
    mon.close()
