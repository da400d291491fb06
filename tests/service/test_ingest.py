"""POST /api/v1/ingest: round trip, idempotency, NaN/Inf, and every rejection leaves nothing behind."""

from __future__ import annotations

import gzip
import json
import math

import msgpack
import pytest
from sqlalchemy import func, select

from layerwatch import wire
from layerwatch_server.storage.models import Run, layer_stats, param_stats, step_stats

from .batches import make_batch, post, unique, value


def count_rows(engine, run_id: str) -> tuple[int, int, int]:
    with engine.connect() as conn:
        return tuple(
            conn.scalar(select(func.count()).select_from(t).where(t.c.run_id == run_id))
            for t in (step_stats, layer_stats, param_stats)
        )


def total_rows(engine) -> tuple[int, ...]:
    with engine.connect() as conn:
        return tuple(conn.scalar(select(func.count()).select_from(t)) for t in (step_stats, layer_stats, Run.__table__))


def test_round_trip_with_nan_and_inf(client, token, engine):
    project = unique()
    tok, rtok = token(project, "write"), token(project, "read")
    specials = {
        (3, 1, "act_mean"): math.nan,
        (4, 2, "act_max_abs"): math.inf,
        (5, 0, "act_std"): -math.inf,
        (6, 3, "sat_frac"): None,
        (7, -1, "loss"): math.nan,
    }
    batch = make_batch("k1", steps=range(10), n_layers=4, project=project, overrides=specials)
    resp = post(client, batch, tok)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["accepted"] == {"steps": 10, "duplicates": 0, "layer_rows": 40, "param_rows": 40}
    assert "non_finite" in {a["rule"] for a in body["alerts"]}  # the batch carries NaN/Inf
    run_id = body["run_id"]
    assert count_rows(engine, run_id) == (10, 40, 40)

    auth = {"Authorization": f"Bearer {rtok}"}
    for (step, layer, stat), expected in specials.items():
        if layer < 0:
            continue
        pts = client.get(
            f"/api/v1/runs/{run_id}/series",
            params={"layer": f"blocks.{layer}.fc", "stat": stat},
            headers=auth,
        ).json()["points"]
        got = {p["step"]: p["value"] for p in pts}
        if expected is None:  # null = not measured at that step: left out of the series
            assert step not in got
        else:
            assert got[step] == {math.inf: "Infinity", -math.inf: "-Infinity"}.get(expected, "NaN")
        other = (step + 1) % 10
        assert got[other] == value(other, layer, wire.LAYER_STATS.index(stat))
    loss = client.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}, headers=auth).json()["points"]
    assert [p["value"] for p in loss][7] == "NaN" and loss[0]["value"] == 1.0
    scalar = client.get(f"/api/v1/runs/{run_id}/series", params={"stat": "weird"}, headers=auth).json()
    assert {p["value"] for p in scalar["points"]} == {"Infinity"}
    grad = client.get(
        f"/api/v1/runs/{run_id}/series",
        params={"layer": "blocks.2.fc.weight", "stat": "grad_norm"},
        headers=auth,
    ).json()["points"]
    assert grad[4] == {"step": 4, "value": value(4, 2, 0)}

    detail = client.get(f"/api/v1/runs/{run_id}", headers=auth).json()
    assert detail["project"] == project and detail["status"] == "running"
    assert [layer["name"] for layer in detail["layers"]] == [f"blocks.{i}.fc" for i in range(4)]
    assert detail["layers"][0] == {
        "name": "blocks.0.fc",
        "type": "Linear",
        "kind": "relu",
        "shape": [-1, 16],
        "units": 16,
    }
    assert detail["first_step"] == 0 and detail["last_step"] == 9
    assert detail["config"] == {"lr": 1e-3, "layers": 4}
    assert detail["ranks"][0]["host"] == "testhost"
    assert detail["mlflow_run_id"] is None


def test_same_batch_twice_is_idempotent(client, token, engine):
    project = unique()
    tok = token(project)
    batch = make_batch("k", steps=range(5), project=project)
    first = post(client, batch, tok).json()
    again = post(client, batch, tok).json()
    assert again["run_id"] == first["run_id"]
    assert again["accepted"] == {"steps": 0, "duplicates": 5, "layer_rows": 0, "param_rows": 0}
    overlap = post(client, make_batch("k", steps=range(3, 8), project=project), tok).json()
    assert overlap["accepted"]["steps"] == 3 and overlap["accepted"]["duplicates"] == 2
    assert count_rows(engine, first["run_id"]) == (8, 32, 32)


def test_layer_indices_are_per_batch(client, token):
    """The wire index of a layer can change between batches; the name is what identifies it."""
    project = unique()
    tok, rtok = token(project), token(project, "read")
    a = make_batch("k", steps=[0], n_layers=2, project=project)
    b = make_batch("k", steps=[1], n_layers=2, project=project)
    b["layers"][0]["index"], b["layers"][1]["index"] = 1, 0  # swap indices, same names
    for row in b["steps"][0]["layers"]:
        row[0] = 1 - row[0]
    run_id = post(client, a, tok).json()["run_id"]
    assert post(client, b, tok).status_code == 202
    pts = client.get(
        f"/api/v1/runs/{run_id}/series",
        params={"layer": "blocks.0.fc", "stat": "act_mean"},
        headers={"Authorization": f"Bearer {rtok}"},
    ).json()["points"]
    assert [p["value"] for p in pts] == [value(0, 0, 0), value(1, 0, 0)]


def test_end_sets_status(client, token):
    project = unique()
    tok, rtok = token(project), token(project, "read")
    run_id = post(client, make_batch("k", steps=[0], project=project), tok).json()["run_id"]
    post(client, make_batch("k", steps=[1], project=project, end="failed"), tok)
    runs = client.get(
        "/api/v1/runs",
        params={"project": project, "status": "failed"},
        headers={"Authorization": f"Bearer {rtok}"},
    ).json()
    assert [(r["id"], r["status"], r["project"]) for r in runs] == [(run_id, "failed", project)]


def test_json_body_accepted(client, token):
    project = unique()
    batch = make_batch("k", steps=[0, 1], project=project, overrides={(0, 0, "act_mean"): math.nan})
    resp = client.post(
        "/api/v1/ingest",
        content=json.dumps(batch).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token(project)}"},
    )
    assert resp.status_code == 202, resp.text


def _mutate(path: str, new):
    def apply(batch):
        *parents, last = path.split(".")
        node = batch
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = new
        return batch

    return apply


INVALID = [
    ("v", _mutate("v", 2), "version"),
    ("missing run", lambda b: {k: v for k, v in b.items() if k != "run"}, "run"),
    ("rank >= world_size", _mutate("rank", 5), "rank"),
    ("bad kind", _mutate("layers.0.kind", "weird"), "layers.0.kind"),
    ("unknown stat", _mutate("layer_stats.0", "bogus"), "layer_stats"),
    ("short row", _mutate("steps.0.layers.0", [0, 1.0]), "steps[0].layers[0]"),
    ("unknown layer index", _mutate("steps.0.layers.0.0", 99), "steps[0].layers[0][0]"),
    ("non-finite time", _mutate("steps.0.time", math.nan), "steps.0.time"),
    ("duplicate step", lambda b: {**b, "steps": b["steps"] + b["steps"][:1]}, "appears twice"),
    ("string value", _mutate("steps.0.layers.0.1", "x"), "steps.0.layers.0.1"),
    ("bad project name", _mutate("run.project", "a b/c"), "run.project"),
]


@pytest.mark.parametrize(("case", "mutate", "named"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_batches_get_422_naming_the_field(client, engine, case, mutate, named):
    before = total_rows(engine)
    batch = mutate(make_batch(unique("k"), steps=range(3), project="p422"))
    resp = client.post(
        "/api/v1/ingest",
        content=gzip.compress(msgpack.packb(batch)),
        headers={
            "Content-Type": wire.CONTENT_TYPE,
            "Content-Encoding": "gzip",
            "Authorization": "Bearer " + _write_token(engine),
        },
    )
    assert resp.status_code == 422, resp.text
    assert named in resp.json()["detail"]
    assert total_rows(engine) == before


_TOKENS: dict[str, str] = {}


def _write_token(engine) -> str:
    from layerwatch_server.storage.tokens import create_token

    key = str(engine.url)
    if key not in _TOKENS:
        _TOKENS[key] = create_token(engine, "p422", "write")
    return _TOKENS[key]


def test_transport_rejections(client, engine, token):
    tok = token("ptransport")
    auth = {"Authorization": f"Bearer {tok}"}
    before = total_rows(engine)
    big = b"\0" * (wire.MAX_BODY_BYTES + 1)
    assert (
        client.post("/api/v1/ingest", content=big, headers={**auth, "Content-Type": wire.CONTENT_TYPE}).status_code
        == 413
    )
    assert (
        client.post("/api/v1/ingest", content=b"hello", headers={**auth, "Content-Type": "text/plain"}).status_code
        == 415
    )
    assert (
        client.post(
            "/api/v1/ingest",
            content=b"x",
            headers={**auth, "Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "br"},
        ).status_code
        == 415
    )
    r = client.post(
        "/api/v1/ingest",
        content=b"not gzip",
        headers={**auth, "Content-Type": wire.CONTENT_TYPE, "Content-Encoding": "gzip"},
    )
    assert r.status_code == 422 and "gzip" in r.json()["detail"]
    r = client.post("/api/v1/ingest", content=b"{", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422
    assert total_rows(engine) == before


def test_auth_rejections(client, engine, token):
    a, b = unique("a"), unique("b")
    batch = make_batch("k", project=a)
    before = total_rows(engine)
    assert post(client, batch).status_code == 401
    assert post(client, batch, "lw_not-a-token").status_code == 401
    assert post(client, batch, token(b, "write")).status_code == 403
    assert post(client, batch, token(a, "read")).status_code == 403
    assert total_rows(engine) == before
    assert post(client, batch, token(a, "admin")).status_code == 202
    assert post(client, make_batch("k2", project=a), token("*", "admin")).status_code == 202


def test_nonfinite_origin_first_one_wins(client, token):
    project = unique()
    tok, rtok = token(project), token(project, "read")
    first = make_batch("k", steps=[0], project=project)
    first["nonfinite_origin"] = {"step": 0, "pass": "backward", "layer": "blocks.1.fc", "rank": 0}
    run_id = post(client, first, tok).json()["run_id"]
    later = make_batch("k", steps=[1], project=project)
    later["nonfinite_origin"] = {"step": 1, "pass": "forward", "layer": "blocks.0.fc", "rank": 0}
    post(client, later, tok)
    detail = client.get(f"/api/v1/runs/{run_id}", headers={"Authorization": f"Bearer {rtok}"}).json()
    assert detail["nonfinite_origin"] == {"step": 0, "pass": "backward", "layer": "blocks.1.fc", "rank": 0}


def test_a_preview_is_judged_not_stored_and_the_earliest_origin_of_any_rank_wins(client, token, engine):
    """Ranks that combine their reports send a tripped interval early as a preview of their own rows: the rules
    raise non_finite from it, the job's combined batch stores the same steps later, without duplicates."""
    project = unique()
    tok, rtok = token(project), token(project, "read")
    clean = {(s, i, "nonfinite"): 0.0 for s in range(10) for i in range(4)}
    nan = {**clean, (2, 0, "act_mean"): math.nan, (2, 0, "act_max_abs"): math.nan, (2, 0, "nonfinite"): 3.0}
    # Rank 0 reports first what DDP's all-reduce showed it: gradients gone NaN at step 2.
    grads = make_batch("k", 0, range(3), project=project, world_size=2, overrides=clean)
    grads["steps"][2]["grad_norm_total"] = math.nan
    grads.update(preview=True, nonfinite_origin={"step": 2, "pass": "backward", "layer": "blocks.0.w", "rank": 0})
    first = post(client, grads, tok).json()
    run_id = first["run_id"]
    assert first["accepted"] == {"steps": 0, "duplicates": 0, "layer_rows": 0, "param_rows": 0}
    # Rank 1 saw it in its forward pass at the same step: an earlier origin, which replaces the first.
    forward = make_batch("k", 1, range(3), project=project, world_size=2, overrides=nan)
    forward.update(preview=True, nonfinite_origin={"step": 2, "pass": "forward", "layer": "blocks.0.fc", "rank": 1})
    (alert,) = [a for a in post(client, forward, tok).json()["alerts"] if a["rule"] == "non_finite"]
    assert alert["state"] == "firing" and alert["rank"] == 1 and alert["step"] == 2
    assert "first at step 2 (forward, layer blocks.0.fc) on rank 1" in alert["message"]
    assert count_rows(engine, run_id) == (0, 0, 0)
    # The combined batch (rank 0) stores every step once, rank 0's preview steps included.
    combined = make_batch("k", 0, range(10), project=project, world_size=2, overrides=nan, seq=1)
    combined["nonfinite_origin"] = {"step": 2, "pass": "forward", "layer": "blocks.0.fc", "rank": 1}
    assert post(client, combined, tok).json()["accepted"]["steps"] == 10
    assert count_rows(engine, run_id) == (10, 40, 40)
    detail = client.get(f"/api/v1/runs/{run_id}", headers={"Authorization": f"Bearer {rtok}"}).json()
    assert detail["nonfinite_origin"] == {"step": 2, "pass": "forward", "layer": "blocks.0.fc", "rank": 1}
