"""One project cannot touch another: silences belong to projects, and whatever is addressed by id in a project
the token does not cover answers exactly as an unknown id does."""

from __future__ import annotations

import math

import pytest
import yaml
from fastapi.testclient import TestClient

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings

from .batches import make_batch, post, unique

# A channel, so that notifications are queued (nothing listens on port 9: the outbox rows are what counts).
CHANNELS = {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "timeout_s": 0.2}}


@pytest.fixture(scope="module")
def client(db_url, engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("tenancy") / "rules.yaml"
    path.write_text(yaml.safe_dump({"channels": CHANNELS, "notify": {"max_backoff_s": 30}}))
    app = create_app(Settings(db_url=db_url, scheduler=False, token_cache_s=0, rules_file=path), engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def tenants(token):
    """Two projects, each with its admin, reader and writer, and an all-projects admin."""
    a, b = unique("a"), unique("b")
    return {
        "a": a,
        "b": b,
        "root": _auth(token("*", "admin")),
        **{f"{role}_{p}": _auth(token(name, role)) for p, name in (("a", a), ("b", b)) for role in ("admin", "read")},
        "write_a": token(a, "write"),
        "write_b": token(b, "write"),
    }


def _firing(client: TestClient, project: str, write: str, root: dict[str, str]) -> tuple[str, list]:
    """A run of ``project`` whose NaN loss fires non_finite: (run id, the alert's queued notifications)."""
    batch = make_batch(unique("k"), steps=range(3), project=project, n_layers=1)
    for step in batch["steps"]:
        step["loss"] = math.nan
    resp = post(client, batch, write)
    assert resp.status_code == 202, resp.text
    alert = next(a for a in resp.json()["alerts"] if a["rule"] == "non_finite")
    return resp.json()["run_id"], client.get(f"/api/v1/alerts/{alert['id']}", headers=root).json()["notifications"]


def test_a_project_admins_silence_covers_its_own_project_only(client, tenants):
    t = tenants
    made = client.post("/api/v1/silences", json={"duration_s": 3600, "comment": "a is noisy"}, headers=t["admin_a"])
    assert made.status_code == 201 and made.json()["project"] == t["a"], made.text
    try:
        assert _firing(client, t["a"], t["write_a"], t["root"])[1] == []  # its own project: muted
        assert _firing(client, t["b"], t["write_b"], t["root"])[1]  # another project: still told
    finally:
        assert client.delete(f"/api/v1/silences/{made.json()['id']}", headers=t["admin_a"]).status_code == 204
    assert _firing(client, t["a"], t["write_a"], t["root"])[1]  # ended: told again


def test_a_run_silence_takes_the_runs_project_and_another_projects_run_is_unknown(client, tenants):
    t = tenants
    run_a, _ = _firing(client, t["a"], t["write_a"], t["root"])
    run_b, _ = _firing(client, t["b"], t["write_b"], t["root"])
    elsewhere = client.post("/api/v1/silences", json={"run_id": run_b, "duration_s": 60}, headers=t["admin_a"])
    unknown = client.post("/api/v1/silences", json={"run_id": "0123456789ab", "duration_s": 60}, headers=t["admin_a"])
    assert elsewhere.status_code == unknown.status_code == 404
    assert elsewhere.json()["detail"].replace(run_b, "ID") == unknown.json()["detail"].replace("0123456789ab", "ID")
    named_b = client.post("/api/v1/silences", json={"project": t["b"], "duration_s": 60}, headers=t["admin_a"])
    assert named_b.status_code == 403
    mismatch = client.post(
        "/api/v1/silences", json={"run_id": run_b, "project": t["a"], "duration_s": 60}, headers=t["root"]
    )
    assert mismatch.status_code == 422
    own = client.post("/api/v1/silences", json={"run_id": run_a, "duration_s": 60}, headers=t["admin_a"])
    assert own.status_code == 201 and own.json()["project"] == t["a"]
    client.delete(f"/api/v1/silences/{own.json()['id']}", headers=t["admin_a"])


def test_a_silence_of_every_project_needs_an_all_projects_admin(client, tenants):
    t = tenants
    made = client.post("/api/v1/silences", json={"duration_s": 3600}, headers=t["root"])
    assert made.status_code == 201 and made.json()["project"] is None
    try:
        assert _firing(client, t["b"], t["write_b"], t["root"])[1] == []  # every project is muted
        ended = client.delete(f"/api/v1/silences/{made.json()['id']}", headers=t["admin_b"])
        assert ended.status_code == 403 and "all projects" in ended.json()["detail"]
    finally:
        assert client.delete(f"/api/v1/silences/{made.json()['id']}", headers=t["root"]).status_code == 204


def test_silence_listings_show_only_readable_projects(client, tenants):
    t = tenants
    ids = {}
    for who, headers in (("a", t["admin_a"]), ("b", t["admin_b"]), ("all", t["root"])):
        body = {"duration_s": 3600, "rule": "never_fires", "comment": f"secret of {who}"}
        ids[who] = client.post("/api/v1/silences", json=body, headers=headers).json()["id"]
    try:

        def listed(headers: dict[str, str]) -> set[str]:
            return {s["id"] for s in client.get("/api/v1/silences", headers=headers).json()} & set(ids.values())

        assert listed(t["read_a"]) == {ids["a"], ids["all"]}  # its project's, and those that cover it too
        assert listed(t["admin_b"]) == {ids["b"], ids["all"]}
        assert listed(_auth(t["write_b"])) == set()  # a job's write token reads nothing
        assert listed(t["root"]) == set(ids.values())
        gone = client.delete(f"/api/v1/silences/{ids['b']}", headers=t["admin_a"])
        unknown = client.delete("/api/v1/silences/0123456789ab", headers=t["admin_a"])
        assert gone.status_code == unknown.status_code == 404
        assert gone.json()["detail"].replace(ids["b"], "ID") == unknown.json()["detail"].replace("0123456789ab", "ID")
    finally:
        for who, headers in (("a", t["admin_a"]), ("b", t["admin_b"]), ("all", t["root"])):
            client.delete(f"/api/v1/silences/{ids[who]}", headers=headers)


def test_another_projects_alert_answers_like_an_unknown_one(client, tenants):
    t = tenants
    run_b, _ = _firing(client, t["b"], t["write_b"], t["root"])
    alert_b = client.get("/api/v1/alerts", params={"run_id": run_b}, headers=t["read_b"]).json()[0]["id"]
    assert client.get(f"/api/v1/alerts/{alert_b}", headers=t["read_b"]).status_code == 200
    theirs = client.get(f"/api/v1/alerts/{alert_b}", headers=t["read_a"])
    unknown = client.get("/api/v1/alerts/0123456789ab", headers=t["read_a"])
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["detail"].replace(alert_b, "ID") == unknown.json()["detail"].replace("0123456789ab", "ID")
    assert client.get("/api/v1/alerts", params={"run_id": run_b}, headers=t["read_a"]).json() == []


@pytest.mark.parametrize("path", ["", "/series?stat=loss", "/latest"])
def test_another_projects_run_answers_like_an_unknown_one(client, tenants, path):
    """By whole id and by prefix: the same status and the same words as for a run that does not exist."""
    t = tenants
    run_b, _ = _firing(client, t["b"], t["write_b"], t["root"])
    assert client.get(f"/api/v1/runs/{run_b}{path}", headers=t["read_b"]).status_code == 200
    for ref, missing in ((run_b, "0123456789ab"), (run_b[:6], "zzzzzz")):
        theirs = client.get(f"/api/v1/runs/{ref}{path}", headers=t["admin_a"])
        unknown = client.get(f"/api/v1/runs/{missing}{path}", headers=t["admin_a"])
        assert theirs.status_code == unknown.status_code == 404, (theirs.text, unknown.text)
        assert theirs.json()["detail"].replace(ref, "REF") == unknown.json()["detail"].replace(missing, "REF")
    write_b = client.get(f"/api/v1/runs/{run_b}{path}", headers=_auth(t["write_b"]))
    assert write_b.status_code == 403  # its own project's run, a scope too narrow: that is no secret
