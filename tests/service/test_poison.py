"""A batch the collector cannot store because of what it holds answers 4xx, never 5xx, and holds nothing back.

A 503 is retried and a client sends its batches in order, so a batch answered 503 for its content would stop
every later batch of its run for good. On SQLite and on PostgreSQL: the poison is refused with a message, the
good batches after it are stored, and nothing of the poison is.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import event, func, select, text

from layerwatch import wire
from layerwatch_server.core import batch as batch_model
from layerwatch_server.storage import ingest
from layerwatch_server.storage.models import Layer, Run, Token

from .batches import make_batch, post, unique
from .test_ingest import count_rows


def _deep(levels: int) -> dict:
    config: dict = {"lr": 1e-3}
    for _ in range(levels - 1):
        config = {"nested": config}
    return config


def _poison(key: str, project: str, how: str) -> dict:
    batch = make_batch(key, steps=range(5), project=project)
    if how == "deep config":
        batch["run"]["config"] = _deep(500)
    elif how == "huge config":
        batch["run"]["config"] = {"notes": "x" * (batch_model.MAX_CONFIG_BYTES + 1)}
    elif how == "NUL in run name":
        batch["run"]["name"] = "run\x00name"
    elif how == "NUL in layer name":
        batch["layers"][1]["name"] = "blocks.1\x00.fc"
    elif how == "NUL in config":
        batch["run"]["config"] = {"tags": ["ok", "not\x00ok"]}
    elif how == "NUL in a scalar's name":
        batch["steps"][0]["scalars"] = {"tok\x00ens": 1.0}
    return batch


POISONS = [
    "deep config",
    "huge config",
    "NUL in run name",
    "NUL in layer name",
    "NUL in config",
    "NUL in a scalar's name",
]


@pytest.mark.parametrize("how", POISONS)
def test_poison_batch_is_refused_and_the_batches_after_it_are_stored(client, token, engine, how):
    project = unique()
    tok, key = token(project, "write"), unique("run")
    resp = post(client, _poison(key, project, how), tok)
    assert resp.status_code == 422, resp.text
    assert ("NUL" if how.startswith("NUL") else "config") in resp.json()["detail"], resp.text  # says what was wrong
    with engine.connect() as conn:  # nothing of it: not even the run
        assert conn.scalar(select(func.count()).select_from(Run).where(Run.key == key)) == 0
    for start in (5, 10, 15):  # the run goes on
        good = post(client, make_batch(key, steps=range(start, start + 5), project=project), tok)
        assert good.status_code == 202, good.text
    assert count_rows(engine, good.json()["run_id"]) == (15, 60, 60)


def test_config_at_the_limits_is_stored(client, token):
    project = unique()
    batch = make_batch(unique("run"), project=project)
    batch["run"]["config"] = {"deep": _deep(batch_model.MAX_CONFIG_DEPTH - 1), "notes": "x" * 100_000}
    assert post(client, batch, token(project, "write")).status_code == 202


def test_content_the_database_refuses_answers_422(client, token, engine, monkeypatch):
    """Whatever validation misses and the database refuses (here a unique key twice, and a value the column
    type cannot bind) is the batch's fault: 422, nothing written, and the collector takes the next one."""
    project = unique()
    tok = token(project, "write")
    post(client, make_batch(unique("run"), project=project), tok)  # the project exists

    def duplicate_project(self, conn, run_id, batch):
        conn.execute(text("INSERT INTO projects (name, created_at) VALUES (:p, :t)"), {"p": project, "t": "2020"})

    def naive_time(self, conn, run_id, batch):
        conn.execute(
            Token.__table__.insert().values(
                project="x", scope="read", token_hash="h", created_at=dt.datetime(2020, 1, 1)
            )
        )

    for refusal in (duplicate_project, naive_time):
        key = unique("run")
        with monkeypatch.context() as patch:
            patch.setattr(ingest.Ingestor, "_first_wins", refusal)
            resp = post(client, make_batch(key, project=project), tok)
        assert resp.status_code == 422, resp.text
        assert "nothing was written" in resp.json()["detail"]
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Run).where(Run.key == key)) == 0
        assert post(client, make_batch(key, project=project), tok).status_code == 202


def _wide(key: str, project: str, names: range, step: int = 0) -> dict:
    layers = [{"index": i, "name": f"layer{n}", "type": "Linear", "kind": "relu"} for i, n in enumerate(names)]
    rows = [[i, *([0.5] * len(wire.LAYER_STATS))] for i in range(len(layers))]
    return {
        "v": wire.VERSION,
        "run": {"key": key, "project": project},
        "layers": layers,
        "steps": [{"step": step, "time": 1.0, "layers": rows}],
    }


def test_more_layers_in_one_batch_than_the_limit_is_refused(client, token):
    project = unique()
    resp = post(client, _wide(unique("run"), project, range(batch_model.MAX_SERIES + 1)), token(project, "write"))
    assert resp.status_code == 422 and resp.json()["detail"].startswith("layers:"), resp.text


def test_more_rows_in_one_batch_than_the_limit_is_refused(client, token, monkeypatch):
    monkeypatch.setattr(batch_model, "MAX_ROWS", 79)
    project = unique()
    resp = post(client, make_batch(unique("run"), steps=range(10), project=project), token(project, "write"))
    assert resp.status_code == 422 and "80 layer and parameter rows" in resp.json()["detail"], resp.text


def test_a_run_stops_growing_at_the_series_limit(client, token, engine, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_SERIES", 100)
    project, key = unique(), unique("run")
    tok = token(project, "write")
    assert post(client, _wide(key, project, range(80)), tok).status_code == 202
    over = post(client, _wide(key, project, range(60, 130), step=1), tok)  # 50 new: 130 in all
    assert over.status_code == 422, over.text
    assert "130 layers" in over.json()["detail"] and "at most 100" in over.json()["detail"]
    assert post(client, _wide(key, project, range(20, 100), step=2), tok).status_code == 202  # 100: the limit
    with engine.connect() as conn:
        run_id = conn.scalar(select(Run.id).where(Run.key == key))
        assert conn.scalar(select(func.count()).select_from(Layer).where(Layer.run_id == run_id)) == 100
    assert count_rows(engine, run_id)[:2] == (2, 160)


def test_new_series_are_registered_in_one_statement(client, token, engine):
    project, key = unique(), unique("run")
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("INSERT INTO LAYERS", "INSERT INTO PARAMS")):
            seen.append(statement.split()[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        resp = post(client, make_batch(key, steps=range(2), n_layers=3000, project=project), token(project, "write"))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert resp.status_code == 202, resp.text
    assert sorted(seen) == ["layers", "params"]
    assert count_rows(engine, resp.json()["run_id"]) == (2, 6000, 6000)
