"""One page per cause, through the collector: three dead layers are three alerts in the API and one notification
naming them; re-notification (on the scheduler, on a fake clock) follows the incident, not each layer."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from layerwatch import wire
from layerwatch_server.api.alerting import make_alerting, parse_alerting
from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.models import OutboxRow

from .batches import make_batch, post, unique

# Nothing listens on port 9: the outbox rows are what these tests look at, not delivery.
CHANNELS = {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "timeout_s": 0.2}}


@pytest.fixture(scope="module")
def client(db_url, engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("incidents") / "rules.yaml"
    path.write_text(yaml.safe_dump({"channels": CHANNELS, "notify": {"max_backoff_s": 30}}))
    settings = Settings(db_url=db_url, no_auth=True, scheduler=False, rules_file=path)
    with TestClient(create_app(settings, engine)) as c:
        yield c


def _dead(key: str, project: str, steps: range, dead: set[int], seq: int = 0) -> dict[str, Any]:
    """Four ReLU layers (the last one is the output head, never judged); those in ``dead`` fully dead."""
    over: dict[tuple[int, int, str], float | None] = {}
    for s in steps:
        for i in range(4):
            over[(s, i, "dead_frac")] = 1.0 if i in dead else 0.0
            over[(s, i, "nonfinite")] = 0.0
    batch = make_batch(key, steps=steps, project=project, n_layers=4, overrides=over, seq=seq)
    for layer in batch["layers"]:
        layer["type"], layer["kind"] = "ReLU", wire.KIND_RELU
    return batch


def _outbox(engine, alert_ids: set[str]) -> list[OutboxRow]:
    with Session(engine) as s:
        return list(s.scalars(select(OutboxRow).where(OutboxRow.alert_id.in_(alert_ids)).order_by(OutboxRow.id)))


def test_three_dead_layers_are_three_alerts_and_one_page_then_one_renotification(client, engine):
    key, project = unique("k"), unique()
    run = post(client, _dead(key, project, range(3), {0, 1, 2})).json()["run_id"]
    alerts = client.get("/api/v1/alerts", params={"run_id": run}).json()
    dead = {a["layer"]: a for a in alerts if a["rule"] == "dead_units"}
    assert {"blocks.0.fc", "blocks.1.fc", "blocks.2.fc"} <= set(dead) and all(
        a["state"] == "firing" for a in dead.values()
    )
    rows = _outbox(engine, {a["id"] for a in dead.values()})
    assert len(rows) == 1  # one page for the cause...
    page = rows[0].payload
    assert page["status"] == "firing" and page["alert"]["rule"] == "dead_units"
    assert page["incident"] == {"rule": "dead_units", "layers": ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]}

    # four hours later the scheduler re-notifies the incident once, not each layer
    later = make_alerting(
        engine, parse_alerting({"channels": CHANNELS}), clock=lambda: utcnow() + dt.timedelta(hours=5)
    )
    later.tick(engine)
    again = [r for r in _outbox(engine, {a["id"] for a in dead.values()}) if "-firing-r" in r.key]
    assert len(again) == 1 and len(again[0].payload["incident"]["layers"]) == 3

    # the layers recover: one resolution for the incident
    post(client, _dead(key, project, range(3, 5), set(), seq=1))
    rows = _outbox(engine, {a["id"] for a in dead.values()})
    assert [r.payload["status"] for r in rows if "-firing-r" not in r.key] == ["firing", "resolved"]
