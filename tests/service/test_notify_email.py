"""Email notifications against a real SMTP server (aiosmtpd on a free loopback port)."""

from __future__ import annotations

import email
import email.policy
import math
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from tests.waiting import wait_until

from .batches import make_batch, post, unique
from .server import free_port

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")


class Mailbox:
    """Keeps every message; answers ``reply`` to DATA (set it to "550 ..." to refuse for good)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], email.message.EmailMessage]] = []
        self.reply = "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reply.startswith("250"):
            msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return self.reply


@pytest.fixture
def smtp():
    box = Mailbox()
    ctl = aiosmtpd_controller.Controller(box, hostname="127.0.0.1", port=free_port())
    ctl.start()
    box.port = ctl.port  # type: ignore[attr-defined]
    yield box
    ctl.stop()


def _client(db_url, engine, tmp_path, port: int) -> TestClient:
    rules = {
        "channels": {"mail": {"type": "email", "host": "127.0.0.1", "port": port, "sender": "lw@test.local",
                              "to": ["oncall@test.local", "ml@test.local"], "timeout_s": 5}},
        "notify": {"max_backoff_s": 0.2, "public_url": "http://collector.local:8000"},
    }  # fmt: skip
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    settings = Settings(db_url=db_url, no_auth=True, scheduler=False, rules_file=path)
    return TestClient(create_app(settings, engine))


def _dead_batch(key: str, project: str) -> dict[str, Any]:
    """Layer blocks.0.fc fully dead for 3 reports (dead_units fires at the second), every count clean otherwise."""
    over: dict[tuple[int, int, str], float | None] = {(s, 0, "dead_frac"): 1.0 for s in range(3)}
    over.update({(s, 0, "nonfinite"): 0.0 for s in range(3)})
    batch = make_batch(key, steps=range(3), project=project, n_layers=1, overrides=over)
    batch["layers"][0]["type"] = "ReLU"  # a lone Linear would be the output head, whose dead_frac is not judged
    return batch


def test_email_arrives_with_the_alert_context(db_url, engine, tmp_path, smtp):
    project, key = unique(), unique("k")
    with _client(db_url, engine, tmp_path, smtp.port) as client:
        body = post(client, _dead_batch(key, project)).json()
        alert = next(a for a in body["alerts"] if a["rule"] == "dead_units" and a["layer"] == "blocks.0.fc")
        wait_until(lambda: any(alert["id"] in m["Message-ID"] for _, _, m in smtp.messages))
        note = client.get(f"/api/v1/alerts/{alert['id']}").json()["notifications"]
    sender, rcpts, msg = next(x for x in smtp.messages if alert["id"] in x[2]["Message-ID"])
    assert sender == "lw@test.local" and rcpts == ["oncall@test.local", "ml@test.local"]
    assert msg["Subject"] == f"[layerwatch WARNING] dead_units blocks.0.fc run run {key}"
    assert msg["Message-ID"] == f"<{note[0]['key']}@layerwatch>"  # the idempotency key
    text = msg.get_content()
    assert f"project {project}" in text and "layer: blocks.0.fc" in text and "step: 1" in text  # for: 2
    assert "100% of its 16 units dead" in text
    assert "dead_frac=1" in text  # the recent reports of the offending series
    assert f"alert: http://collector.local:8000/api/v1/alerts/{alert['id']}" in text
    assert f"health_map: http://collector.local:8000/api/v1/runs/{body['run_id']}/health_map" in text
    assert note[0]["state"] == "sent" and note[0]["attempts"] == 1


def test_email_nan_alert_names_the_origin(db_url, engine, tmp_path, smtp):
    batch = make_batch(unique("k"), steps=range(2), project=unique(), n_layers=1,
                       overrides={(1, -1, "loss"): math.nan})  # fmt: skip
    batch["nonfinite_origin"] = {"step": 1, "pass": "forward", "layer": "blocks.0.fc", "rank": 0}
    with _client(db_url, engine, tmp_path, smtp.port) as client:
        alert = next(a for a in post(client, batch).json()["alerts"] if a["rule"] == "non_finite")
        wait_until(lambda: any(alert["id"] in m["Message-ID"] for _, _, m in smtp.messages))
    msg = next(m for _, _, m in smtp.messages if alert["id"] in m["Message-ID"])
    assert msg["Subject"].startswith("[layerwatch CRITICAL] non_finite")
    assert "first NaN/Inf: step 1, forward pass, layer blocks.0.fc" in msg.get_content()


def test_email_refused_for_good_is_not_retried(db_url, engine, tmp_path, smtp):
    smtp.reply = "550 mailbox unavailable"
    with _client(db_url, engine, tmp_path, smtp.port) as client:
        alert = next(a for a in post(client, _dead_batch(unique("k"), unique())).json()["alerts"])
        url = f"/api/v1/alerts/{alert['id']}"
        wait_until(lambda: client.get(url).json()["notifications"][0]["state"] == "failed")
        n = client.get(url).json()["notifications"][0]
    assert n["attempts"] == 1 and "550" in n["history"][0]["error"]


def test_email_temporary_failure_is_retried(db_url, engine, tmp_path, smtp):
    smtp.reply = "451 try again later"
    with _client(db_url, engine, tmp_path, smtp.port) as client:
        alert = next(a for a in post(client, _dead_batch(unique("k"), unique())).json()["alerts"])
        url = f"/api/v1/alerts/{alert['id']}"
        wait_until(lambda: client.get(url).json()["notifications"][0]["attempts"] >= 1)
        smtp.reply = "250 OK"
        wait_until(lambda: client.get(url).json()["notifications"][0]["state"] == "sent")
        n = client.get(url).json()["notifications"][0]
    assert n["attempts"] >= 2 and "451" in n["history"][0]["error"]
    assert any(alert["id"] in m["Message-ID"] for _, _, m in smtp.messages)
