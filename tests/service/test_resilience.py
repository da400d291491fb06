"""Overload and database trouble: 429/503 with Retry-After, nothing written, never another 5xx."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from layerwatch_server.app import create_app
from layerwatch_server.core.config import Settings
from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.models import RuleDef, Run

from .batches import make_batch, post
from .test_ingest import count_rows, total_rows


def test_overload_answers_429(engine, db_url):
    app = create_app(Settings(db_url=db_url, no_auth=True, scheduler=False, max_inflight=1), engine)
    with TestClient(app) as client:
        state = app.state.lw
        before = total_rows(engine)
        with state.admission:  # the one slot is taken
            resp = post(client, make_batch("busy", project="p429"))
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
        assert total_rows(engine) == before
        assert post(client, make_batch("busy", project="p429")).status_code == 202


def test_sqlite_write_lock_timeout_answers_503(tmp_path):
    from layerwatch_server.storage.migrations import upgrade

    url = f"sqlite:///{tmp_path}/lock.db"
    upgrade(url)
    app = create_app(Settings(db_url=url, no_auth=True, scheduler=False, db_timeout_s=0.2))
    with TestClient(app, raise_server_exceptions=False) as client:
        lock = app.state.lw.ingestor._write_lock
        with lock:  # another writer holds the database
            resp = post(client, make_batch("k", project="p503"))
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        assert post(client, make_batch("k", project="p503")).status_code == 202


def test_database_down_answers_503():
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"  # nothing listens there
    app = create_app(Settings(db_url=url, no_auth=True, scheduler=False, db_timeout_s=1))
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = post(client, make_batch("k", project="pdown"))
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1", resp.text
        assert "nothing was written" in resp.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert client.get("/api/v1/projects").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_failing_ingest_hook_does_not_fail_a_committed_batch(engine, db_url):
    app = create_app(Settings(db_url=db_url, no_auth=True, scheduler=False), engine)

    def broken(batch, result):
        raise RuntimeError("rule bug")

    app.state.lw.ingest_hooks.clear()  # only these two: the built-in rules would add their alerts
    app.state.lw.ingest_hooks.append(broken)
    app.state.lw.ingest_hooks.append(lambda batch, result: [{"rule": "demo", "run": result.run_id}])
    with TestClient(app) as client:
        resp = post(client, make_batch("hooked", project="phook"))
    assert resp.status_code == 202
    assert resp.json()["alerts"] == [{"rule": "demo", "run": resp.json()["run_id"]}]


def test_failing_rule_evaluation_rolls_back_to_its_savepoint_and_keeps_the_batch(engine, db_url):
    """Rules run inside the batch's transaction: a failure there undoes only what the rules wrote."""
    app = create_app(Settings(db_url=db_url, no_auth=True, scheduler=False), engine)
    name = "written-then-failed"

    def broken(conn, batch, res):
        conn.execute(RuleDef.__table__.insert().values(name=name, spec={}, updated_at=utcnow()))
        raise RuntimeError("rule bug")

    ingestor = app.state.lw.ingestor
    ingestor.in_transaction["alerting"] = broken  # in place of the real evaluation
    with TestClient(app) as client:
        resp = post(client, make_batch("savepoint", project="psave"))
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"]["steps"] == 10 and resp.json()["alerts"] == []
    assert count_rows(engine, resp.json()["run_id"]) == (10, 40, 40)  # the batch is stored ...
    with engine.connect() as conn:  # ... and what the failed hook wrote is not
        assert conn.scalar(select(func.count()).select_from(RuleDef).where(RuleDef.name == name)) == 0


def test_sqlite_batch_without_new_rows_commits_beside_another_writer(tmp_path, caplog):
    """close()'s last batch (end status, no steps) reads before its first write. On SQLite its transaction must
    take the write lock at BEGIN: in a deferred one, another writer (here the MLflow mirror's) committing after
    that read makes the first write fail at once ("database is locked", no busy wait) and the batch a 503."""
    from layerwatch_server.mirrors import source
    from layerwatch_server.storage.migrations import upgrade

    url = f"sqlite:///{tmp_path}/writers.db"
    upgrade(url)
    app = create_app(Settings(db_url=url, no_auth=True, scheduler=False))
    with TestClient(app, raise_server_exceptions=False) as client:
        run_id = post(client, make_batch("closing", project="pwriters")).json()["run_id"]
        engine = app.state.lw.engine
        other = threading.Thread(target=source.set_mlflow_run_id, args=(engine, run_id, "m" * 32))

        hooks = app.state.lw.ingestor.in_transaction
        evaluate = hooks["alerting"]

        def meanwhile(conn, batch, res):  # the rules read the run first; the other writer commits in between
            conn.execute(select(func.count()).select_from(RuleDef))
            other.start()
            other.join(0.5)  # it commits now, or waits for the batch's commit
            return evaluate(conn, batch, res)

        hooks["alerting"] = meanwhile
        last = make_batch("closing", steps=[], project="pwriters", end="finished")
        last["run"]["config"] = None  # as ranks other than 0 send it: nothing for the run row before the hooks
        resp = post(client, last)
        other.join()
    assert resp.status_code == 202, resp.text
    assert "failed" not in caplog.text
    check = make_engine(url)
    with check.connect() as conn:
        assert conn.scalar(select(Run.mlflow_run_id).where(Run.id == run_id)) == "m" * 32
        assert conn.scalar(select(Run.status).where(Run.id == run_id)) == "finished"
    check.dispose()


def test_a_collector_bug_answers_500_and_writes_nothing(engine, db_url, monkeypatch):
    """503 means the database is away; a bug is not that. 500, logged, nothing kept: the client keeps the batch
    and retries it, so it is stored once the collector is fixed."""
    from layerwatch_server.storage.ingest import Ingestor

    def broken(self, conn, run_id, batch, new_steps):
        raise KeyError("a bug")

    app = create_app(Settings(db_url=db_url, no_auth=True, scheduler=False), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        before = total_rows(engine)
        with monkeypatch.context() as patch:
            patch.setattr(Ingestor, "_touch", broken)
            resp = post(client, make_batch("buggy", project="pbug"))
        assert resp.status_code == 500 and "KeyError" in resp.json()["detail"], resp.text
        assert total_rows(engine) == before
        assert post(client, make_batch("buggy", project="pbug")).status_code == 202
