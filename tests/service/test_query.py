"""Query API: listing, run detail, series selection and downsampling, read permissions."""

from __future__ import annotations

import math

from layerwatch_server.storage.queries import downsample

from .batches import make_batch, post, unique


def test_downsample_keeps_spikes_and_nan():
    points = [{"step": i, "value": float(i % 7)} for i in range(10_000)]
    points[4321]["value"] = 1e9
    points[777]["value"] = -1e9
    points[9000]["value"] = math.nan
    out = downsample(points, 100)
    assert len(out) <= 100
    values = [p["value"] for p in out]
    assert 1e9 in values and -1e9 in values and any(v != v for v in values)
    assert [p["step"] for p in out] == sorted(p["step"] for p in out)
    assert downsample(points[:50], 100) == points[:50]


def test_series_endpoint_downsamples_server_side(client, token):
    project = unique()
    tok, rtok = token(project), token(project, "read")
    spike = {(137, 1, "act_max_abs"): 5e6}
    for start in range(0, 400, 100):
        batch = make_batch("k", steps=range(start, start + 100), n_layers=2, project=project, overrides=spike)
        run_id = post(client, batch, tok).json()["run_id"]
    auth = {"Authorization": f"Bearer {rtok}"}
    params = {"layer": "blocks.1.fc", "stat": "act_max_abs"}
    full = client.get(f"/api/v1/runs/{run_id}/series", params=params, headers=auth).json()
    assert len(full["points"]) == 400
    small = client.get(f"/api/v1/runs/{run_id}/series", params={**params, "max_points": 20}, headers=auth).json()
    assert len(small["points"]) <= 20 and 5e6 in [p["value"] for p in small["points"]]
    window = client.get(f"/api/v1/runs/{run_id}/series", params={**params, "start": 10, "end": 19}, headers=auth)
    assert [p["step"] for p in window.json()["points"]] == list(range(10, 20))


def test_series_errors(client, token):
    project = unique()
    rtok = token(project, "read")
    run_id = post(client, make_batch("k", steps=[0], project=project), token(project)).json()["run_id"]
    auth = {"Authorization": f"Bearer {rtok}"}
    base = f"/api/v1/runs/{run_id}/series"
    assert client.get(base, params={"stat": "act_mean"}, headers=auth).status_code == 422  # needs a layer
    assert client.get(base, params={"stat": "nope", "layer": "blocks.0.fc"}, headers=auth).status_code == 422
    assert client.get(base, params={"stat": "act_mean", "layer": "nope"}, headers=auth).status_code == 404
    assert client.get("/api/v1/runs/nope/series", params={"stat": "loss"}, headers=auth).status_code == 404
    assert client.get(base, params={"stat": "loss", "max_points": 1}, headers=auth).status_code == 422


def test_read_permissions_across_projects(client, token):
    a, b = unique("a"), unique("b")
    run_a = post(client, make_batch("k", project=a), token(a)).json()["run_id"]
    run_b = post(client, make_batch("k", project=b), token(b)).json()["run_id"]
    read_a = {"Authorization": f"Bearer {token(a, 'read')}"}
    assert client.get(f"/api/v1/runs/{run_a}", headers=read_a).status_code == 200
    assert client.get(f"/api/v1/runs/{run_b}", headers=read_a).status_code == 404  # as unknown (test_tenancy)
    assert client.get(f"/api/v1/runs/{run_b}/series", params={"stat": "loss"}, headers=read_a).status_code == 404
    assert client.get("/api/v1/runs", params={"project": b}, headers=read_a).status_code == 403
    assert {r["project"] for r in client.get("/api/v1/runs", headers=read_a).json()} == {a}
    assert [p["name"] for p in client.get("/api/v1/projects", headers=read_a).json()] == [a]
    write_a = {"Authorization": f"Bearer {token(a, 'write')}"}
    assert client.get(f"/api/v1/runs/{run_a}", headers=write_a).status_code == 403
    assert client.get("/api/v1/projects", headers=write_a).status_code == 403  # not an empty list: "no projects"
    assert client.get("/api/v1/projects").status_code == 401
    everything = {"Authorization": f"Bearer {token('*', 'admin')}"}
    names = {p["name"] for p in client.get("/api/v1/projects", headers=everything).json()}
    assert {a, b} <= names
    runs = client.get("/api/v1/runs", headers=everything).json()
    assert {run_a, run_b} <= {r["id"] for r in runs} and {"id", "name", "project", "status"} <= set(runs[0])


def test_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    spec = client.get("/openapi.json").json()
    assert "/api/v1/ingest" in spec["paths"] and "Batch" in spec["components"]["schemas"]


def test_series_downsampled_by_the_database_keeps_what_downsample_keeps(client, token):
    """On PostgreSQL the buckets are chosen in SQL; the kept points are exactly those of ``downsample``."""
    project = unique()
    tok, auth = token(project), {"Authorization": f"Bearer {token(project, 'read')}"}
    odd = {(s, 0, "act_std"): v for s, v in ((37, math.nan), (38, math.inf), (90, -math.inf), (211, math.nan))}
    odd |= {(s, 0, "act_std"): None for s in range(150, 160)}  # not measured: not a point
    odd |= {(s, 0, "act_std"): 7.0 for s in range(300, 330)}  # ties: the first minimum and maximum are kept
    for start in range(0, 500, 100):
        batch = make_batch("k", steps=range(start, start + 100), n_layers=1, project=project, overrides=odd)
        run_id = post(client, batch, tok).json()["run_id"]
    url, params = f"/api/v1/runs/{run_id}/series", {"layer": "blocks.0.fc", "stat": "act_std"}
    full = client.get(url, params=params, headers=auth).json()["points"]
    assert len(full) == 490

    def number(p: dict) -> dict:
        return {"step": p["step"], "value": float(p["value"])}  # "NaN", "Infinity" as the API writes them

    for max_points in (2, 20, 61, 489, 490, 1000):
        got = client.get(url, params={**params, "max_points": max_points}, headers=auth).json()["points"]
        want = downsample([number(p) for p in full], max_points)
        assert [p["step"] for p in got] == [p["step"] for p in want], max_points
        assert [str(number(p)["value"]) for p in got] == [str(p["value"]) for p in want]
