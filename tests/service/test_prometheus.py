"""/metrics: the latest statistics per run and layer, bounded cardinality, the collector's health."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from layerwatch_server.app import create_app
from layerwatch_server.core.batch import Batch
from layerwatch_server.core.config import Settings
from layerwatch_server.observability.snapshot import LatestSnapshot

from .batches import make_batch, post, unique


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def scrape(snapshot: LatestSnapshot) -> str:
    registry = CollectorRegistry()
    registry.register(snapshot)
    return generate_latest(registry).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_latest_values_aggregates_and_sparse_stats():
    snap = LatestSnapshot(("dead_frac", "act_std"), ("grad_norm",))
    # dead_frac measured at step 10 only; the batch ends at step 12
    over = {(s, i, "dead_frac"): None for s in (11, 12) for i in range(4)}
    snap.update(Batch.model_validate(make_batch("k", steps=range(10, 13), overrides=over, project="p")), "r1")
    got = samples(scrape(snap))
    lab = frozenset({"project": "p", "run": "r1", "layer": "blocks.2.fc"}.items())
    assert got[("layerwatch_layer_dead_frac", lab)] == 10_000 + 2 + 0.4
    assert got[("layerwatch_layer_act_std", lab)] == 12_000 + 2 + 0.1
    run = frozenset({"project": "p", "run": "r1"}.items())
    assert got[("layerwatch_run_step", run)] == 12 and got[("layerwatch_run_loss", run)] == 1 / 13
    # blocks.3.fc, the last layer, is an output head: the run-level figures read dead units as the rule does
    assert got[("layerwatch_run_dead_frac_max", run)] == 10_000 + 2 + 0.4
    assert got[
        ("layerwatch_param_grad_norm", frozenset({"project": "p", "run": "r1", "param": "blocks.3.fc.weight"}.items()))
    ]


def test_cardinality_cap_regex_and_expiry():
    clock = Clock()
    snap = LatestSnapshot(("dead_frac",), (), max_layers=2, layer_regex=r"fc$", stale_s=60, ended_s=10, clock=clock)
    snap.update(Batch.model_validate(make_batch("a", steps=[0], n_layers=5)), "a")
    snap.update(Batch.model_validate(make_batch("b", steps=[0], end="finished")), "b")
    layers = {dict(k[1]).get("layer") for k in samples(scrape(snap)) if k[0] == "layerwatch_layer_dead_frac"}
    assert layers == {"blocks.0.fc", "blocks.1.fc"}  # model order, capped at 2 per run
    clock.now += 11  # b ended 11 s ago
    assert {dict(k[1]).get("run") for k in samples(scrape(snap))} - {None} == {"a"}
    clock.now += 60  # a is stale
    assert samples(scrape(snap))[("layerwatch_snapshot_runs", frozenset())] == 0


def test_alert_states():
    snap = LatestSnapshot()
    snap.update(Batch.model_validate(make_batch("a", steps=[0])), "a")
    snap.set_alerts("a", [{"rule": "dead_units", "severity": "warning", "state": "firing"}] * 2)
    key = ("layerwatch_alerts", frozenset({"project": "proj", "run": "a", "rule": "dead_units", "severity": "warning",
                                           "state": "firing"}.items()))  # fmt: skip
    assert samples(scrape(snap))[key] == 2


def test_thousand_runs_of_hundred_layers_stay_small_and_fast():
    snap = LatestSnapshot()  # the defaults of Settings
    batch = Batch.model_validate(make_batch("x", steps=range(10), n_layers=100))
    start = time.perf_counter()
    for i in range(1000):
        snap.update(batch, f"run{i:04d}")
    per_batch_ms = time.perf_counter() - start  # 1000 batches -> s == ms per batch
    start = time.perf_counter()
    text = scrape(snap)
    render_s = time.perf_counter() - start
    print(f"\nupdate {per_batch_ms:.3f} ms/batch; /metrics {len(text) / 1e6:.1f} MB in {render_s:.2f} s")
    # Size is deterministic: 16 layers per run by default (model order) plus the run-level gauges.
    assert len(text) < 2.5e6 and per_batch_ms < 5 and render_s < 5


def test_metrics_endpoint_exposes_health(tmp_path):
    settings = Settings(db_url=f"sqlite:///{tmp_path}/lw.db", scheduler=False, no_auth=True, mlflow_tracking_uri="off")
    from layerwatch_server.storage.migrations import upgrade

    upgrade(settings.db_url)
    with TestClient(create_app(settings)) as client:
        run_id = post(client, make_batch(unique(), steps=range(3))).json()["run_id"]
        text = client.get("/metrics").text
    got = samples(text)
    assert got[("layerwatch_ingest_rows_total", frozenset({"kind": "layer"}.items()))] == 12
    ok = frozenset({"method": "POST", "route": "/ingest", "status": "202"}.items())
    assert got[("layerwatch_http_requests_total", ok)] == 1
    assert ("layerwatch_http_request_duration_seconds_count", frozenset({"route": "/ingest"}.items())) in got
    assert got[("layerwatch_ingest_inflight", frozenset())] == 0
    assert (
        "layerwatch_layer_dead_frac",
        frozenset({"project": "proj", "run": run_id, "layer": "blocks.0.fc"}.items()),
    ) in got
