"""End to end against real server processes on loopback ports and the real PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from layerwatch_server.storage.engine import make_engine
from layerwatch_server.storage.migrations import upgrade
from layerwatch_server.storage.models import JobTick, RuleState, layer_stats, step_stats
from tests.waiting import wait_until

from .batches import make_batch, post, unique
from .dbs import fresh_pg_database
from .server import running_server

pytestmark = [pytest.mark.slow]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "layerwatch_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _inflight(base: str) -> float:
    """The collector's count of ingest requests in flight, from its /metrics."""
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    return float(re.search(r"^layerwatch_ingest_inflight (\S+)$", metrics, re.M).group(1))


@pytest.fixture(scope="module")
def pg_url():
    with fresh_pg_database() as url:
        yield url


@pytest.mark.postgres
def test_refuses_unmigrated_then_serves_with_tokens(pg_url, tmp_path):
    res = cli("serve", "--db", pg_url, "--port", "0")
    assert res.returncode != 0 and "layerwatch-server migrate" in res.stderr
    assert cli("migrate", "--db", pg_url).returncode == 0
    created = cli("token", "create", "--project", "e2e", "--scope", "write", "--db", pg_url)
    assert created.returncode == 0, created.stderr
    write = created.stdout.strip()
    read = cli("token", "create", "--project", "e2e", "--scope", "read", "--db", pg_url).stdout.strip()
    assert write.startswith("lw_") and write != read
    with (
        running_server(pg_url, log_path=tmp_path / "server.log") as (base, proc),
        httpx.Client(base_url=base) as http,
    ):
        resp = post(http, make_batch("e2e-run", steps=range(20), project="e2e"), write)
        assert resp.status_code == 202, resp.text
        run_id = resp.json()["run_id"]
        assert (
            post(http, make_batch("e2e-run", steps=range(20), project="e2e"), write).json()["accepted"]["duplicates"]
            == 20
        )
        auth = {"Authorization": f"Bearer {read}"}
        runs = http.get("/api/v1/runs", params={"project": "e2e"}, headers=auth).json()
        assert [r["id"] for r in runs] == [run_id]
        pts = http.get(f"/api/v1/runs/{run_id}/series", params={"stat": "loss"}, headers=auth).json()
        assert len(pts["points"]) == 20
        assert http.get("/readyz").status_code == 200
    # SIGTERM: uvicorn drains, runs the lifespan shutdown, then re-raises the signal (exit -15).
    assert proc.returncode in (0, -15)
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()


def test_embedded_default_database_is_created(tmp_path):
    """`serve` with no database configured migrates a brand-new embedded SQLite file."""
    import os
    import signal

    from .server import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerwatch_server.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("LAYERWATCH_")},
    )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), 30, "the embedded server to be ready")
        assert (tmp_path / "layerwatch-data" / "layerwatch.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_no_auth_refused_on_public_host():
    res = cli("serve", "--no-auth", "--host", "0.0.0.0", "--db", "sqlite:////tmp/never.db")
    assert res.returncode != 0 and "--force-no-auth" in res.stderr


@pytest.mark.postgres
def test_two_replicas_ingest_concurrently_and_share_the_scheduler(tmp_path):
    """Two processes over one database: no duplicate, no lost row; each job tick runs on one replica."""
    with fresh_pg_database() as url:
        upgrade(url)
        env = {
            "LAYERWATCH_NO_AUTH": "1",
            "LAYERWATCH_RETENTION_INTERVAL_S": "1",
            "LAYERWATCH_JOB_INTERVAL_S": "1",
            "LAYERWATCH_LOG_LEVEL": "debug",  # each tick's "ran" line is a debug message
        }
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        with (
            running_server(url, log_path=logs[0], env=env) as (a, _),
            running_server(url, log_path=logs[1], env=env) as (b, _),
            httpx.Client(base_url=a, timeout=60) as ca,
            httpx.Client(base_url=b, timeout=60) as cb,
        ):
            project = unique()
            # 8 ranks x 20 batches of 10 steps; every batch is sent to BOTH replicas at once.
            jobs = [(rank, start) for rank in range(8) for start in range(0, 200, 10)]

            def send(job):
                rank, start = job
                batch = make_batch(
                    "shared",
                    rank=rank,
                    steps=range(start, start + 10),
                    n_layers=5,
                    project=project,
                    world_size=8,
                )
                with ThreadPoolExecutor(2) as pool:
                    r1, r2 = pool.map(lambda c: post(c, batch), (ca, cb))
                return r1, r2

            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(send, jobs))

            def contended() -> bool:  # a few ticks ran, and both replicas went for at least one of them
                text = "".join(log.read_text() for log in logs)
                return len(re.findall(r" ran replica=", text)) >= 2 and "skipped (claimed" in text

            wait_until(contended, 30, "both replicas to contend for a scheduler tick")
        for r1, r2 in results:
            assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
            assert r1.json()["accepted"]["steps"] + r2.json()["accepted"]["steps"] == 10
            assert r1.json()["run_id"] == r2.json()["run_id"]
        engine = make_engine(url)
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(step_stats)) == 8 * 200
            assert conn.scalar(select(func.count()).select_from(layer_stats)) == 8 * 200 * 5
            ticks = conn.execute(select(JobTick.job, JobTick.tick, JobTick.replica)).all()
            # rules ran inside each batch's transaction on both replicas: every rank's memory saw its last step
            memory = conn.execute(select(RuleState.rank, RuleState.data)).all()
        assert sorted((rank, data["last_step"]) for rank, data in memory) == [(r, 199) for r in range(8)]
        for log in logs:  # and no evaluation failed (rolled back to its savepoint) on either replica
            assert "in-transaction ingest hook" not in log.read_text()
        engine.dispose()
    ran: dict[tuple[str, int], list[str]] = {}
    for log in logs:
        for job, tick in re.findall(r"job (\w+) tick=(\d+) ran", log.read_text()):
            ran.setdefault((job, int(tick)), []).append(log.name)
    assert ran, "no scheduled job ran"
    assert all(len(who) == 1 for who in ran.values()), ran
    assert len(ran) == len({(j, t) for j, t, _ in ticks})
    skipped = sum(len(re.findall(r"skipped \(claimed", log.read_text())) for log in logs)
    assert skipped >= 1, "both replicas should have tried the same ticks"


@pytest.mark.postgres
def test_sigterm_lets_inflight_ingest_commit(pg_url, tmp_path):
    """A batch in flight when SIGTERM arrives is committed and acknowledged; then the process exits."""
    import signal
    import threading

    upgrade(pg_url)
    big = make_batch("sigterm", steps=range(80), n_layers=300, project="term")  # 24,000 layer rows (and param rows)
    result = {}
    with running_server(pg_url, log_path=tmp_path / "s.log", env={"LAYERWATCH_NO_AUTH": "1"}) as (base, proc):

        def send():
            with httpx.Client(base_url=base, timeout=60) as http:
                result["resp"] = post(http, big)

        sender = threading.Thread(target=send)
        sender.start()
        seen = wait_until(lambda: "in flight" if _inflight(base) >= 1 else not sender.is_alive() and "done", 30)
        assert seen == "in flight", "the batch was stored before the test saw it in flight"
        proc.send_signal(signal.SIGTERM)
        sender.join(60)
        proc.wait(60)
    resp = result["resp"]
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"]["layer_rows"] == 24_000
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        run_rows = conn.scalar(
            select(func.count()).select_from(layer_stats).where(layer_stats.c.run_id == resp.json()["run_id"])
        )
    engine.dispose()
    assert run_rows == 24_000
