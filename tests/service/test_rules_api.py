"""Rules, silences and time-based rules through the collector: rules CRUD with an admin token, per-run
overrides sent by the client, silences that mute notifications but keep the alert, ``stalled`` on a fake
clock (no sleeping)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from layerwatch_server.api.alerting import make_alerting, parse_alerting
from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.rules.service import Alerting
from layerwatch_server.storage.base import utcnow

from .batches import make_batch, post, unique

# A channel is needed for notifications to be queued; nothing listens on port 9, and delivery is not
# what these tests look at (the outbox rows are).
CHANNELS = {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "timeout_s": 0.2}}


@pytest.fixture(scope="module")
def app_client(db_url, engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"channels": CHANNELS, "notify": {"max_backoff_s": 30}}))
    settings = Settings(db_url=db_url, scheduler=False, token_cache_s=0, rules_file=path)
    app = create_app(settings, engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.alerting = app.state.lw.alerting  # type: ignore[attr-defined]
        yield c


@pytest.fixture(scope="module")
def admin(token) -> dict[str, str]:
    return {"Authorization": f"Bearer {token('*', 'admin')}"}


def _alerts(client: TestClient, headers: dict[str, str], run_id: str) -> dict[str, dict[str, Any]]:
    got = client.get("/api/v1/alerts", params={"run_id": run_id}, headers=headers).json()
    return {f"{a['rule']}|{a['layer'] or ''}": a for a in got}


def _notifications(client: TestClient, headers: dict[str, str], alert_id: str) -> list[dict[str, Any]]:
    return client.get(f"/api/v1/alerts/{alert_id}", headers=headers).json()["notifications"]


def _nan(key: str, project: str, steps=range(3), config: dict[str, Any] | None = None) -> dict[str, Any]:
    b = make_batch(key, steps=steps, project=project, n_layers=1, overrides={(s, -1, "loss"): math.nan for s in steps})
    if config is not None:
        b["run"]["config"] = config
    return b


# -- rules CRUD ---------------------------------------------------------------------------------------------------
def test_rules_crud_with_an_admin_token(app_client, admin, token):
    project = unique()
    rule = {"name": unique("big_loss"), "stat": "loss", "op": ">", "threshold": 100.0, "for": 1, "project": project}
    r = app_client.post("/api/v1/rules", json=rule, headers=admin)
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "api" and r.json()["for"] == 1
    assert app_client.post("/api/v1/rules", json=rule, headers=admin).status_code == 409
    listed = {x["name"]: x for x in app_client.get("/api/v1/rules", headers=admin).json()}
    assert listed[rule["name"]]["source"] == "api" and listed["dead_units"]["source"] == "builtin"
    assert listed["dead_units"]["threshold"] == 0.5

    # the rule is live at once: a run of that project breaking it gets an alert
    key = unique("k")
    batch = make_batch(key, steps=range(3), project=project, n_layers=1, overrides={(2, -1, "loss"): 1000.0})
    body = post(app_client, batch, token=admin["Authorization"].split()[1]).json()
    assert any(a["rule"] == rule["name"] and a["state"] == "firing" and a["value"] == 1000.0 for a in body["alerts"])

    put = app_client.put(f"/api/v1/rules/{rule['name']}", json={**rule, "threshold": 5000.0}, headers=admin)
    assert put.status_code == 200 and put.json()["threshold"] == 5000.0
    # a built-in can be tuned through the API too
    tuned = app_client.put("/api/v1/rules/saturation", json={"threshold": 0.9, "project": project}, headers=admin)
    assert tuned.status_code == 200 and tuned.json()["kind"] == "saturation" and tuned.json()["for"] == 2

    assert app_client.delete(f"/api/v1/rules/{rule['name']}", headers=admin).status_code == 204
    assert app_client.delete(f"/api/v1/rules/{rule['name']}", headers=admin).status_code == 404
    assert app_client.delete("/api/v1/rules/saturation", headers=admin).status_code == 204
    names = {x["name"] for x in app_client.get("/api/v1/rules", headers=admin).json()}
    assert rule["name"] not in names and "saturation" in names  # the built-in is back to its defaults


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "r1", "threshold": 1.0}, "stat"),
        ({"name": "r1", "stat": "loss"}, "threshold"),
        ({"name": "r1", "stat": "loss", "threshold": 1, "op": "=>"}, "op"),
        ({"name": "r1", "stat": "loss", "threshold": 1, "for": 0}, "for"),
        ({"name": "r1", "stat": "loss", "threshold": 1, "severity": "page"}, "severity"),
        ({"name": "r1", "stat": "loss", "threshold": 1, "colour": "red"}, "colour"),
        ({"name": "bad name!", "stat": "loss", "threshold": 1}, "name"),
        ({"stat": "loss", "threshold": 1}, "name"),
        ({"name": "dead_units", "run_threshold": 3}, "run_threshold"),
    ],
)
def test_an_invalid_rule_is_refused_naming_the_field(app_client, admin, body, field):
    r = app_client.post("/api/v1/rules", json=body, headers=admin)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"], r.json()


def test_rules_need_an_all_projects_admin_token(app_client, token):
    project = unique()
    for scope in ("read", "write", "admin"):  # a project admin is not enough either
        h = {"Authorization": f"Bearer {token(project, scope)}"}
        assert app_client.get("/api/v1/rules", headers=h).status_code == 403
        r = app_client.post("/api/v1/rules", json={"name": "x", "stat": "loss", "threshold": 1}, headers=h)
        assert r.status_code == 403 and "admin" in r.json()["detail"]
        assert app_client.delete("/api/v1/rules/x", headers=h).status_code == 403
    assert app_client.get("/api/v1/rules").status_code == 401


# -- per-run overrides ----------------------------------------------------------------------------------------------
def test_per_run_overrides_from_the_client(app_client, admin):
    project = unique()
    rules = {"non_finite": {"enabled": False}, "tiny_lr": {"stat": "lr", "op": "<", "threshold": 1.0}}
    body = post(
        app_client, _nan(unique("k"), project, config={"hparams": {"rules": rules}}), admin["Authorization"][7:]
    )
    fired = {a["rule"] for a in body.json()["alerts"]}
    assert "non_finite" not in fired and "tiny_lr" in fired
    control = post(app_client, _nan(unique("k"), project), admin["Authorization"][7:]).json()
    assert "non_finite" in {a["rule"] for a in control["alerts"]} and "tiny_lr" not in {
        a["rule"] for a in control["alerts"]
    }


# -- silences -------------------------------------------------------------------------------------------------------
def test_a_silence_mutes_notifications_not_the_alert_for_its_duration(app_client, admin, token):
    project = unique()
    write = {"Authorization": f"Bearer {token(project, 'write')}"}
    bad = {"project": project, "rule": "non_finite", "duration_s": 3600}
    assert app_client.post("/api/v1/silences", json=bad, headers=write).status_code == 403
    made = app_client.post("/api/v1/silences", json={**bad, "comment": "known issue"}, headers=admin)
    assert made.status_code == 201
    assert made.json()["id"] in {s["id"] for s in app_client.get("/api/v1/silences", headers=admin).json()}

    run = post(app_client, _nan(unique("k"), project), write["Authorization"][7:]).json()["run_id"]
    alert = _alerts(app_client, admin, run)["non_finite|"]
    assert alert["state"] == "firing"  # recorded and visible...
    assert _notifications(app_client, admin, alert["id"]) == []  # ...but nobody is told

    other = post(app_client, _nan(unique("k"), unique()), admin["Authorization"][7:]).json()["run_id"]
    assert _notifications(app_client, admin, _alerts(app_client, admin, other)["non_finite|"]["id"])  # other project

    # two hours later (the alerting clock, not a sleep) the silence is over
    al: Alerting = app_client.alerting
    real = al.clock
    al.clock = lambda: utcnow() + dt.timedelta(hours=2)
    try:
        later = post(app_client, _nan(unique("k"), project), write["Authorization"][7:]).json()["run_id"]
    finally:
        al.clock = real
    notes = _notifications(app_client, admin, _alerts(app_client, admin, later)["non_finite|"]["id"])
    assert [n["status"] for n in notes] == ["firing"] and notes[0]["channel"] == "hook"


# -- stalled --------------------------------------------------------------------------------------------------------
def test_stalled_on_a_fake_clock(app_client, admin, engine):
    project = unique()
    key = unique("k")
    ok = {(s, 0, "nonfinite"): 0.0 for s in range(6)}  # make_batch's filler counts are not 0
    run = post(
        app_client,
        make_batch(key, steps=range(3), project=project, n_layers=1, overrides=ok),
        admin["Authorization"][7:],
    ).json()["run_id"]
    now = [utcnow()]
    al = make_alerting(engine, parse_alerting({"channels": CHANNELS}), clock=lambda: now[0])

    now[0] += dt.timedelta(seconds=200)  # below the 300 s default
    al.tick(engine)
    assert "stalled|" not in _alerts(app_client, admin, run)

    now[0] += dt.timedelta(seconds=200)
    al.tick(engine)
    stalled = _alerts(app_client, admin, run)["stalled|"]
    assert stalled["state"] == "firing" and stalled["severity"] == "critical" and stalled["value"] >= 300
    assert app_client.get(f"/api/v1/runs/{run}", headers=admin).json()["status"] == "stalled"
    assert [n["status"] for n in _notifications(app_client, admin, stalled["id"])] == ["firing"]
    al.tick(engine)  # still stalled: no second alert, no second notification (the run is not "running")
    assert len(_notifications(app_client, admin, stalled["id"])) == 1

    # data again: the run is running, the alert resolves and says why
    post(
        app_client,
        make_batch(key, steps=range(3, 6), project=project, n_layers=1, overrides=ok, seq=1),
        admin["Authorization"][7:],
    )
    after = _alerts(app_client, admin, run)["stalled|"]
    assert after["state"] == "resolved" and "sending data again" in after["message"]
    assert [n["status"] for n in _notifications(app_client, admin, stalled["id"])] == ["firing", "resolved"]


def test_stalled_can_be_tuned_per_run(app_client, admin, engine):
    config = {"hparams": {"rules": {"stalled": {"threshold": 3600}}}}
    b = make_batch(unique("k"), steps=range(2), project=unique(), n_layers=1)
    b["run"]["config"] = config
    run = post(app_client, b, admin["Authorization"][7:]).json()["run_id"]
    al = make_alerting(engine, parse_alerting({}), clock=lambda: utcnow() + dt.timedelta(seconds=1800))
    al.tick(engine)
    assert "stalled|" not in _alerts(app_client, admin, run)


def test_the_rule_bodies_have_their_schema_in_openapi(app_client):
    paths = app_client.get("/openapi.json").json()["paths"]
    for path, method, required in (("/api/v1/rules", "post", ["name"]), ("/api/v1/rules/{name}", "put", [])):
        schema = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == required and schema["additionalProperties"] is False
        assert {"stat", "op", "threshold", "for", "severity", "layer"} <= set(schema["properties"])
