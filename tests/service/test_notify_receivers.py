"""Notifications against real receivers: a local HTTP server (webhook, Slack) and a real Alertmanager."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from tests.waiting import wait_until

from .batches import make_batch, post, unique
from .server import free_port

AM = "/usr/bin/prometheus-alertmanager"


class Receiver:
    """Records POSTs; answers ``status`` (set it to 503 to play a receiver that is down)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict, dict]] = []
        self.status = 200
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.status == 200:
                    outer.got.append((self.path, dict(self.headers), body))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def _app(db_url, engine, tmp_path, channels):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"channels": channels, "notify": {"max_backoff_s": 0.5}}))
    return create_app(Settings(db_url=db_url, no_auth=True, scheduler=False, rules_file=path), engine)


def _nan_batch(key: str, project: str, steps=range(5)):
    over = {(s, -1, "loss"): float("nan") for s in steps}
    return make_batch(key, steps=steps, project=project, overrides=over, n_layers=1)


def test_webhook_and_slack_survive_a_receiver_outage(db_url, engine, tmp_path, receiver):
    app = _app(db_url, engine, tmp_path, {
        "hook": {"type": "webhook", "url": receiver.url + "/hook"},
        "chat": {"type": "slack", "url": receiver.url + "/slack"},
    })  # fmt: skip
    receiver.status = 503  # down
    with TestClient(app) as client:
        body = post(client, _nan_batch(unique("k"), unique())).json()
        alert = next(a for a in body["alerts"] if a["rule"] == "non_finite")
        url = f"/api/v1/alerts/{alert['id']}"

        def tried() -> list | None:  # every channel tried the receiver that is down
            notes = client.get(url).json()["notifications"]
            return notes if notes and all(n["attempts"] >= 1 for n in notes) else None

        assert all(n["state"] == "pending" for n in wait_until(tried, message=lambda: client.get(url).json()))
        receiver.status = 200  # back up: every notification arrives
        wait_until(
            lambda: {n["state"] for n in client.get(url).json()["notifications"]} == {"sent"},
            10,
            lambda: client.get(url).json(),
        )
    assert {p for p, _, _ in receiver.got} >= {"/hook", "/slack"}
    hook = next(b for p, _, b in receiver.got if p == "/hook" and b["alert"]["id"] == alert["id"])
    assert hook["alert"]["rule"] == "non_finite" and hook["run"]["project"] and hook["status"] == "firing"
    headers = next(h for p, h, b in receiver.got if p == "/hook" and b["key"] == hook["key"])
    assert headers["Idempotency-Key"] == hook["key"]
    assert any("non_finite" in b["text"] for p, _, b in receiver.got if p == "/slack")


def test_receiver_4xx_is_recorded_not_retried(db_url, engine, tmp_path, receiver):
    app = _app(db_url, engine, tmp_path, {"hook": {"type": "webhook", "url": receiver.url}})
    receiver.status = 400
    with TestClient(app) as client:
        alert = next(a for a in post(client, _nan_batch(unique("k"), unique())).json()["alerts"])
        wait_until(lambda: client.get(f"/api/v1/alerts/{alert['id']}").json()["notifications"][0]["state"] == "failed")
        n = client.get(f"/api/v1/alerts/{alert['id']}").json()["notifications"][0]
    assert n["attempts"] == 1 and n["history"][0]["status"] == 400


@pytest.mark.skipif(not Path(AM).exists(), reason="prometheus-alertmanager not installed (scripts/test installs it)")
def test_alertmanager_lists_the_alert_and_its_resolution(db_url, engine, tmp_path):
    port = free_port()
    cfg = tmp_path / "am.yml"
    cfg.write_text("route: {receiver: 'null'}\nreceivers: [{name: 'null'}]\n")
    proc = subprocess.Popen(
        [
            AM,
            f"--config.file={cfg}",
            f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    am = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(am), 20)
        app = _app(db_url, engine, tmp_path, {"am": {"type": "alertmanager", "url": am}})
        key, project = unique("k"), unique()
        with TestClient(app) as client:
            post(client, _nan_batch(key, project))
            wait_until(lambda: _am_alerts(am, project))
            found = _am_alerts(am, project)[0]
            assert found["labels"]["alertname"] == "non_finite" and found["status"]["state"] == "active"
            clean = {(st, 0, "nonfinite"): 0.0 for st in range(5, 10)}  # make_batch's filler counts are not 0
            post(client, make_batch(key, steps=range(5, 10), project=project, n_layers=1, overrides=clean))
            wait_until(lambda: not _am_alerts(am, project, active=True))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp_path / "am", ignore_errors=True)


def _up(am: str) -> bool:
    try:
        return httpx.get(f"{am}/-/ready", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _am_alerts(am: str, project: str, active: bool | None = None) -> list[dict]:
    params = {"filter": f'project="{project}"'}
    if active:
        params["active"] = "true"
    got = httpx.get(f"{am}/api/v2/alerts", params=params, timeout=2).json()
    if active:
        got = [a for a in got if a["status"]["state"] == "active"]
    return [a for a in got if a["labels"].get("alertname") == "non_finite"]
