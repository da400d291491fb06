"""Per-layer histograms: the real client's counts survive the wire and storage exactly; the endpoint reads them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from layerwatch_server.core.batch import Batch

from .batches import make_batch, post, unique

EDGES = [-1.0, 0.0, 1.0]


def with_histograms(batch: dict, entries: list[dict], edges: list[float] = EDGES) -> dict:
    return {**batch, "histograms": {"edges": edges, "layers": entries}}


def entry(layer: str, step: int, counts: list[int], kind: str = "activation", nan: int = 0) -> dict:
    return {"layer": layer, "kind": kind, "step": step, "counts": counts, "nan": nan}


def test_real_client_counts_survive_wire_and_storage(client, token, tmp_path: Path):
    torch = pytest.importorskip("torch")
    import layerwatch
    from tests.client.conftest import read_spool

    project = unique()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    mon = layerwatch.watch(model, project=project, mode="offline", spool_dir=str(tmp_path), every=2, histogram_every=2)
    for _ in range(6):
        x = torch.randn(16, 8) * 1e3
        model(x).pow(2).mean().backward()
        mon.step()
        model.zero_grad()
    mon.close()
    batches = read_spool(tmp_path)
    sent = [e for b in batches for e in b.get("histograms", {}).get("layers", [])]
    assert {e["step"] for e in sent} == {1, 3, 5}
    tok, auth = token(project), {"Authorization": f"Bearer {token(project, 'read')}"}
    for batch in batches:
        assert post(client, batch, tok).status_code == 202  # msgpack, gzip: as the client sends it
    run_id = post(client, batches[-1], tok).json()["run_id"]  # re-sent: stored once
    edges = batches[0]["histograms"]["edges"]
    for layer, kind in (("1", "activation"), ("0", "gradient"), ("2", "gradient")):
        got = client.get(f"/api/v1/runs/{run_id}/histograms", params={"layer": layer, "kind": kind}, headers=auth)
        assert got.status_code == 200, got.text
        body = got.json()
        mine = sorted((e for e in sent if e["layer"] == layer and e["kind"] == kind), key=lambda e: e["step"])
        assert body["edges"] == edges
        assert body["steps"] == [1, 3, 5]
        assert body["counts"] == [e["counts"] for e in mine] and body["nan"] == [e["nan"] for e in mine]
    relu = client.get(f"/api/v1/runs/{run_id}/histograms", params={"layer": "1"}, headers=auth).json()
    assert [sum(c) for c in relu["counts"]] == [16 * 32] * 3  # every element measured, in one bin each


def test_counts_beyond_float_precision_are_exact(client, token):
    project = unique()
    huge = [2**62, 2**53 + 1, 3, 0]  # a float (or float JSON) would round the first two
    batch = with_histograms(make_batch("k", steps=[0], project=project), [entry("blocks.0.fc", 0, huge, nan=2**60)])
    run_id = post(client, batch, token(project)).json()["run_id"]
    auth = {"Authorization": f"Bearer {token(project, 'read')}"}
    body = client.get(f"/api/v1/runs/{run_id}/histograms", params={"layer": "blocks.0.fc"}, headers=auth).json()
    assert body == {
        "run_id": run_id,
        "layer": "blocks.0.fc",
        "kind": "activation",
        "edges": EDGES,
        "steps": [0],
        "counts": [huge],
        "nan": [2**60],
        "merged": [1],
    }


def test_downsampling_sums_buckets_and_keeps_every_count(client, token):
    project = unique()
    tok, auth = token(project), {"Authorization": f"Bearer {token(project, 'read')}"}
    entries = [entry("x", s, [s, 1, 0, 0]) for s in range(100)]
    entries[37] = entry("x", 37, [0, 0, 0, 1], nan=5)  # one value in the overflow bin, and NaNs
    run_id = post(client, with_histograms(make_batch("k", steps=[0], project=project), entries), tok).json()["run_id"]
    url = f"/api/v1/runs/{run_id}/histograms"
    small = client.get(url, params={"layer": "x", "max_points": 10}, headers=auth).json()
    assert small["steps"] == list(range(9, 100, 10)) and small["merged"] == [10] * 10
    assert sum(c[3] for c in small["counts"]) == 1 and sum(small["nan"]) == 5
    assert sum(map(sum, small["counts"])) == sum(map(sum, (e["counts"] for e in entries)))
    window = client.get(url, params={"layer": "x", "start": 10, "end": 12}, headers=auth).json()
    assert window["steps"] == [10, 11, 12] and window["counts"][0] == [10, 1, 0, 0]


def test_errors_and_permissions(client, token):
    project = unique()
    tok = token(project)
    base = make_batch("k", steps=[0], project=project)
    run_id = post(client, with_histograms(base, [entry("x", 0, [1, 2, 3, 4])]), tok).json()["run_id"]
    auth = {"Authorization": f"Bearer {token(project, 'read')}"}
    url = f"/api/v1/runs/{run_id}/histograms"
    assert client.get(url, params={"layer": "x", "kind": "weights"}, headers=auth).status_code == 422
    assert client.get(url, params={"layer": "nope"}, headers=auth).status_code == 404
    assert client.get(url, params={"layer": "x", "kind": "gradient"}, headers=auth).status_code == 404
    assert client.get(url, params={"layer": "x", "start": 5}, headers=auth).json()["steps"] == []
    assert client.get("/api/v1/runs/nope/histograms", params={"layer": "x"}, headers=auth).status_code == 404
    assert client.get(url, params={"layer": "x"}).status_code == 401
    other = {"Authorization": f"Bearer {token(unique(), 'read')}"}
    assert client.get(url, params={"layer": "x"}, headers=other).status_code in (403, 404)
    bad_edges = with_histograms(base, [entry("x", 1, [1, 2, 3, 4])], edges=[1.0, 0.0, 2.0])
    bad_len = with_histograms(base, [entry("x", 1, [1, 2])])
    negative = with_histograms(base, [entry("x", 1, [1, -2, 3, 4])])
    for bad in (bad_edges, bad_len, negative):
        answer = post(client, bad, tok)
        assert answer.status_code == 422 and "histograms" in answer.text, answer.text


def test_the_key_is_optional_and_unknown_keys_are_ignored():
    """The version rule: a new optional key keeps v=1. A batch without ``histograms`` is read as before, and a
    collector ignores keys it does not know, as one before ``histograms`` ignores that key."""
    batch = make_batch("k", steps=[0])
    assert Batch.model_validate(batch).histograms is None
    later = copy.deepcopy(batch)
    later["a_key_of_a_later_client"] = {"anything": [1, 2]}
    assert Batch.model_validate(later).model_dump() == Batch.model_validate(batch).model_dump()
