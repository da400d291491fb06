"""Naming a run as people do: a unique prefix of its id (git-style), a token that cannot read told so instead of
an empty list, and a run's latest layer values in model order."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from layerwatch_server.storage import ingest

from .batches import make_batch, post, unique


@pytest.fixture
def two_runs_sharing_a_prefix(client, token, monkeypatch: pytest.MonkeyPatch):
    """Two runs whose ids start alike (ids are random: the test chooses them), and a read token for both."""
    shared = uuid.uuid4().hex[:6]
    ids = iter([f"{shared}aaaaaa", f"{shared}bbbbbb"])
    monkeypatch.setattr(ingest, "secrets", SimpleNamespace(token_hex=lambda _: next(ids)))  # run ids only
    project = unique()
    write = token(project)
    made = [
        post(client, make_batch(unique("k"), steps=range(3), project=project), write).json()["run_id"] for _ in "ab"
    ]
    assert made == [f"{shared}aaaaaa", f"{shared}bbbbbb"]
    return shared, {"Authorization": f"Bearer {token(project, 'read')}"}


def test_a_unique_prefix_names_the_run(client, two_runs_sharing_a_prefix):
    shared, auth = two_runs_sharing_a_prefix
    run = client.get(f"/api/v1/runs/{shared}a", headers=auth)
    assert run.status_code == 200 and run.json()["id"] == f"{shared}aaaaaa"
    latest = client.get(f"/api/v1/runs/{shared}bb/latest", headers=auth)
    assert latest.status_code == 200 and latest.json()["run_id"] == f"{shared}bbbbbb"
    series = client.get(f"/api/v1/runs/{shared}b/series", params={"stat": "loss"}, headers=auth)
    assert series.status_code == 200 and series.json()["run_id"] == f"{shared}bbbbbb"


def test_an_ambiguous_or_short_prefix_is_refused_with_a_reason(client, two_runs_sharing_a_prefix):
    shared, auth = two_runs_sharing_a_prefix
    ambiguous = client.get(f"/api/v1/runs/{shared}", headers=auth)
    assert ambiguous.status_code == 422
    assert ambiguous.json()["detail"] == (
        f"run id prefix {shared!r} is ambiguous: more than one run id starts with it; give more of the id"
    )
    assert client.get(f"/api/v1/runs/{shared[:3]}", headers=auth).status_code == 404  # under 4 characters
    assert client.get(f"/api/v1/runs/{shared}a%25", headers=auth).status_code == 404  # no LIKE wildcards


def test_a_write_token_cannot_list_and_is_told_why(client, token):
    project = unique()
    post(client, make_batch(unique("k"), steps=range(2), project=project), token(project))
    write = {"Authorization": f"Bearer {token(project)}"}
    for path in ("/api/v1/runs", "/api/v1/projects"):
        answer = client.get(path, headers=write)
        assert answer.status_code == 403
        assert "needs a read or admin token" in answer.json()["detail"]


def test_latest_lists_layers_in_model_order(client, token):
    """Execution order, not the order the layers were first stored in, nor their names' order."""
    project = unique()
    batch = make_batch(unique("k"), steps=range(3), project=project)
    names = {0: "net.10", 1: "net.9", 2: "net.1", 3: "net.0"}
    for layer in batch["layers"]:
        layer["name"] = names[layer["index"]]
    batch["layers"].reverse()
    run_id = post(client, batch, token(project)).json()["run_id"]
    latest = client.get(f"/api/v1/runs/{run_id}/latest", headers={"Authorization": f"Bearer {token(project, 'read')}"})
    assert [layer["name"] for layer in latest.json()["layers"]] == ["net.10", "net.9", "net.1", "net.0"]
