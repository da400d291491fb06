"""Static checks of deploy/: what can be validated without a container engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.storage.migrations import upgrade
from tests.service.batches import make_batch, post

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\blayerwatch_[a-z_]+")


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name a collector's /metrics shows once a run reported and had an alert."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db')}/lw.db"
    upgrade(url)
    # a mirror that is never contacted (scheduler off), so its gauges are exposed too
    settings = Settings(db_url=url, scheduler=False, no_auth=True, mlflow_tracking_uri="http://127.0.0.1:9")
    with TestClient(create_app(settings)) as client:
        run_id = post(client, make_batch("k", steps=range(3))).json()["run_id"]
        telemetry = client.app.state.lw.telemetry
        telemetry.snapshot.set_alerts(run_id, [{"rule": "dead_units", "severity": "warning", "state": "firing"}])
        telemetry.notification_failures.labels("slack")
        client.get("/healthz")
        text = client.get("/metrics").text
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_compose_parses_and_references_existing_files():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"collector", "postgres", "mlflow", "prometheus", "alertmanager", "grafana", "migrate"} <= set(
        compose["services"]
    )
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
    text = (DEPLOY / "compose.yaml").read_text()
    assert not re.search(r"^\s*\w*PASSWORD:\s*(?!\$\{)\S", text, re.M), "a literal password: use ${VAR:?...}"


def test_dockerfile_copies_existing_paths():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (DEPLOY.parent / src).exists(), src


def test_k8s_manifests_have_the_expected_kinds_and_probes():
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Job", "Namespace", "Kustomization"} <= kinds
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    for res in kustomization["resources"]:
        assert (DEPLOY / "k8s" / res).is_file()
    assert "secret.example.yaml" not in kustomization["resources"]  # the real Secret is created out of band
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert deploy["spec"]["replicas"] >= 2
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    for key in next(d for d in docs if d["kind"] == "ConfigMap")["data"]:
        assert key.lower().removeprefix("layerwatch_") in Settings.model_fields, key


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (scripts/test installs it)")
def test_prometheus_rules_pass_promtool():
    out = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "prometheus" / "rules.yml")], capture_output=True)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def _names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def test_rules_and_dashboard_query_metrics_that_exist(exposed):
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "layerwatch.json").read_text())
    dash_exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    dash_exprs += [v["query"] for v in dash["templating"]["list"]]
    missing = (_names(rule_exprs) | _names(dash_exprs)) - exposed
    assert not missing, f"queried but not exposed by /metrics: {sorted(missing)}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    assert all(w in titles for w in ("dead fraction", "loss", "gradient", "alerts", "ingest"))
